/* The BLAS shim of mlx_distill/_skinny_blas.py (see its docstring for the why and the measurements):
   defines cblas_sgemm only, takes the few-row calls of decoding (its own kernel; other skinny calls to BLIS)
   and forwards the rest to OpenBLAS. It also exports mlx_distill_attend, the one-query attention of
   mlx_distill/fastdecode.py, which shares the kernel's helper threads. Built by _skinny_blas.load() with
   -D BIG_PATH, SMALL_PATH, DEFAULT_ROWS, KERNEL_ROWS, SPIN_US, PREFETCH and KERNEL_ON. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>
#ifndef RTLD_DEEPBIND
#error "BLIS would call OpenBLAS's sgemm_ without RTLD_DEEPBIND (glibc only)"
#endif
#if defined(__x86_64__) || defined(__i386__)
#define RELAX() __builtin_ia32_pause()
#elif defined(__aarch64__)
#define RELAX() __asm__ __volatile__("yield")
#else
#define RELAX() do {} while (0)
#endif

typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float*, int, const float*, int, float,
                         float*, int);
static sgemm_fn big_fn, small_fn;
static int max_rows = DEFAULT_ROWS, kernel_rows = KERNEL_ROWS, own = KERNEL_ON, nthreads = 1;
static long spin_ns = SPIN_US * 1000L;
static pthread_once_t once = PTHREAD_ONCE_INIT;
long mlx_distill_skinny_calls;  /* calls the own kernel took (read by the tests) */

/* ---- the own kernel: C[m][n] = alpha * sum_k A[m][k] * B[n][k] (+ beta * C), row-major, B transposed ----
   Each weight row is read once from memory for all rows of A (up to 12 at a time); two weight rows share the loads
   of A (which stays in L1). The sums are reduced with a shuffle tree, and the next weight rows are prefetched
   PREFETCH floats ahead, which took one thread from 5.5 to 9 GB/s out of cache on a 2-core AMD EPYC. */
typedef float v16 __attribute__((vector_size(64), aligned(4)));
typedef float v8 __attribute__((vector_size(32)));
typedef float v4 __attribute__((vector_size(16)));
#define LD(p) (*(const v16*)(p))

static inline float hsum(v16 v) {
  v8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
         __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  v4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
}

typedef struct { int m, k, lda, ldb, ldc; float alpha, beta; const float *a, *b; float* c; } job_t;

static inline void put(const job_t* j, int m, int n, float s) {
  float* c = j->c + (size_t)m * j->ldc + n;
  *c = j->beta == 0.0f ? j->alpha * s : j->alpha * s + j->beta * *c;
}

static inline __attribute__((always_inline)) void kern(int M, const job_t* j, int m0, int n0, int n1) {
  const int K = j->k, K16 = K & ~15;
  const float* A = j->a + (size_t)m0 * j->lda;
  int n = n0;
  for (; n + 1 < n1; n += 2) {
    v16 s0[12], s1[12];
    for (int m = 0; m < M; m++) s0[m] = s1[m] = (v16){0};
    const float* b0 = j->b + (size_t)n * j->ldb;
    const float* b1 = b0 + j->ldb;
    for (int k = 0; k < K16; k += 16) {
      v16 w0 = LD(b0 + k), w1 = LD(b1 + k);
      __builtin_prefetch(b0 + k + PREFETCH);
      __builtin_prefetch(b1 + k + PREFETCH);
      for (int m = 0; m < M; m++) {
        v16 x = LD(A + (size_t)m * j->lda + k);
        s0[m] += x * w0;
        s1[m] += x * w1;
      }
    }
    for (int m = 0; m < M; m++) {
      float t0 = hsum(s0[m]), t1 = hsum(s1[m]);
      for (int k = K16; k < K; k++) {
        t0 += A[(size_t)m * j->lda + k] * b0[k];
        t1 += A[(size_t)m * j->lda + k] * b1[k];
      }
      put(j, m0 + m, n, t0);
      put(j, m0 + m, n + 1, t1);
    }
  }
  for (; n < n1; n++) {
    const float* b0 = j->b + (size_t)n * j->ldb;
    for (int m = 0; m < M; m++) {
      float t = 0;
      for (int k = 0; k < K; k++) t += A[(size_t)m * j->lda + k] * b0[k];
      put(j, m0 + m, n, t);
    }
  }
}

/* Rows of x in equal groups of at most 12 (24 sums in registers: 16 rows as 8 + 8); past 12 rows, each block
   of NB weight rows is read from memory by the first group and from cache by the others. */
#define NB 16
static void part(const job_t* j, int n0, int n1) {
  const int groups = (j->m + 11) / 12, size = (j->m + groups - 1) / groups;
  for (int nb = n0; nb < n1; nb += NB) {
    int ne = nb + NB < n1 ? nb + NB : n1;
    for (int m0 = 0; m0 < j->m; m0 += size) {
      switch (j->m - m0 < size ? j->m - m0 : size) {  /* one specialisation per row count */
#define ROWS(r) case r: kern(r, j, m0, nb, ne); break;
        ROWS(1) ROWS(2) ROWS(3) ROWS(4) ROWS(5) ROWS(6) ROWS(7) ROWS(8) ROWS(9) ROWS(10) ROWS(11) ROWS(12)
      }
    }
  }
}

/* ---- helper threads: one per extra core; each spins SPIN_US after a job (decoding calls come ~0.1 ms
   apart), then sleeps on a condition variable. One caller at a time; a second concurrent caller (another
   MLX stream) runs its call alone on its own thread. ---- */
#define MAX_THREADS 16
#define DEFAULT_THREADS 8  /* two streams of memory already come close to a 2-core box's bandwidth; more is untested */
static job_t job;
static void (*work)(int, int);  /* the current call's share of rows (sgemm) or of (sequence, head) pairs (attention) */
static int bounds[MAX_THREADS + 1];
static atomic_int generation, pending, sleepers;
static pthread_mutex_t busy = PTHREAD_MUTEX_INITIALIZER, mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static int helpers_started;

static long now_ns(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec * 1000000000L + t.tv_nsec;
}

static void* helper(void* arg) {
  int id = (int)(size_t)arg, seen = 0;
  for (;;) {
    long t0 = now_ns();
    int g, spins = 0;
    while ((g = atomic_load(&generation)) == seen) {
      RELAX();
      if (++spins % 256 == 0 && now_ns() - t0 > __atomic_load_n(&spin_ns, __ATOMIC_RELAXED)) {
        pthread_mutex_lock(&mu);
        atomic_fetch_add(&sleepers, 1);
        while ((g = atomic_load(&generation)) == seen) pthread_cond_wait(&cv, &mu);
        atomic_fetch_sub(&sleepers, 1);
        pthread_mutex_unlock(&mu);
        break;
      }
    }
    seen = g;
    work(bounds[id], bounds[id + 1]);
    atomic_fetch_sub(&pending, 1);
  }
  return NULL;
}

static void after_fork_in_child(void) {  /* the helpers do not exist in a forked child */
  helpers_started = 0;
  nthreads = 1;
  pthread_mutex_init(&busy, NULL);
}

static void sgemm_work(int n0, int n1) { part(&job, n0, n1); }

/* The helpers for one call: false when they cannot be had (one core, or another caller holds them; that
   caller then runs its call alone). The holder sets the job, then calls run_parallel, which releases them. */
static int claim(void) {
  if (nthreads < 2 || pthread_mutex_trylock(&busy) != 0) return 0;
  if (!helpers_started) {
    helpers_started = 1;
    for (int i = 1; i < nthreads; i++) {
      pthread_t th;
      pthread_attr_t at;
      pthread_attr_init(&at);
      pthread_attr_setstacksize(&at, 1 << 16);
      if (pthread_create(&th, &at, helper, (void*)(size_t)i) != 0) nthreads = i;
      pthread_attr_destroy(&at);
    }
  }
  return 1;
}

/* fn over [0, n) split between the caller and the helpers (pair: even bounds). */
static void run_parallel(void (*fn)(int, int), int n, int pair) {
  const int t = nthreads;
  work = fn;
  for (int i = 0; i <= t; i++) bounds[i] = pair ? (int)((long)n * i / t) & ~1 : (int)((long)n * i / t);
  bounds[t] = n;
  atomic_store(&pending, t - 1);
  atomic_fetch_add(&generation, 1);
  if (atomic_load(&sleepers) > 0) {
    pthread_mutex_lock(&mu);
    pthread_cond_broadcast(&cv);
    pthread_mutex_unlock(&mu);
  }
  fn(bounds[0], bounds[1]);
  while (atomic_load(&pending) > 0) RELAX();
  pthread_mutex_unlock(&busy);
}

static void own_sgemm(const job_t* j, int n) {
  __atomic_fetch_add(&mlx_distill_skinny_calls, 1, __ATOMIC_RELAXED);
  if (n >= 256 * nthreads && claim()) {
    job = *j;
    run_parallel(sgemm_work, n, 1);
    return;
  }
  part(j, 0, n);
}

static void init(void) {
  /* The big library is already loaded (globally) by the time MLX calls; find its own symbol. */
  void* big = dlopen(BIG_PATH, RTLD_NOW | RTLD_NOLOAD);
  if (!big) big = dlopen(BIG_PATH, RTLD_NOW | RTLD_GLOBAL);
  if (big) big_fn = (sgemm_fn)dlsym(big, "cblas_sgemm");
  if (SMALL_PATH[0]) {
    void* small = dlopen(SMALL_PATH, RTLD_NOW | RTLD_LOCAL | RTLD_DEEPBIND);
    if (small) {
      small_fn = (sgemm_fn)dlsym(small, "cblas_sgemm");
      void (*threads)(long) = (void (*)(long))dlsym(small, "bli_thread_set_num_threads");
      if (threads && !getenv("BLIS_NUM_THREADS")) threads(sysconf(_SC_NPROCESSORS_ONLN));
    }
  }
  const char* v = getenv("MLX_DISTILL_SKINNY_ROWS");
  if (v) max_rows = atoi(v);
  v = getenv("MLX_DISTILL_SKINNY_KERNEL_ROWS");
  if (v) kernel_rows = atoi(v);
  v = getenv("MLX_DISTILL_SKINNY_KERNEL");
  if (v && v[0]) own = !(v[0] == '0' || v[0] == 'f' || v[0] == 'n' || (v[0] == 'o' && v[1] == 'f'));
  v = getenv("MLX_DISTILL_SKINNY_THREADS");
  cpu_set_t cpus;  /* the cores this process may run on (a container's cpuset), at most DEFAULT_THREADS */
  int usable = sched_getaffinity(0, sizeof cpus, &cpus) == 0 ? CPU_COUNT(&cpus) : (int)sysconf(_SC_NPROCESSORS_ONLN);
  nthreads = v ? atoi(v) : (usable < DEFAULT_THREADS ? usable : DEFAULT_THREADS);
  if (nthreads < 1) nthreads = 1;
  if (nthreads > MAX_THREADS) nthreads = MAX_THREADS;
  v = getenv("MLX_DISTILL_SKINNY_SPIN_US");
  if (v) spin_ns = atol(v) * 1000L;
  pthread_atfork(NULL, NULL, after_fork_in_child);
}

/* A few rows by a small, not transposed B (m <= kernel_rows, n a multiple of 16 up to 256): attention's
   probabilities by the values cache while decoding, one row and head a call (2,160 calls a decode step of the demo
   model). The row of C stays in registers over k; one thread (a call is ~10 us of work). */
static void own_nn(const job_t* j, int n) {
  __atomic_fetch_add(&mlx_distill_skinny_calls, 1, __ATOMIC_RELAXED);
  for (int m = 0; m < j->m; m++) {
    const float* a = j->a + (size_t)m * j->lda;
    float* c = j->c + (size_t)m * j->ldc;
    v16 acc[16];
    const int nv = n / 16;
    for (int i = 0; i < nv; i++) acc[i] = (v16){0};
    for (int k = 0; k < j->k; k++) {
      const float* b = j->b + (size_t)k * j->ldb;
      const float x = a[k];
      for (int i = 0; i < nv; i++) acc[i] += x * LD(b + 16 * i);
    }
    for (int i = 0; i < nv; i++)
      for (int t = 0; t < 16; t++) {
        float* out = c + 16 * i + t;
        *out = j->beta == 0.0f ? j->alpha * acc[i][t] : j->alpha * acc[i][t] + j->beta * *out;
      }
  }
}

/* ---- one-query attention for decoding (mlx_distill/fastdecode.py) ----
   Each sequence's keys and values live in a slot of a per-layer cache, kc and vc: (slots, hkv, cap, d). A call
   appends each sequence's new key and value at position lens[i] of its slot, then attends its query heads over
   positions 0..lens[i]: softmax(q k^T * scale) v, in fp32 as MLX's own. The G = hq / hkv query heads of a key
   head share each key and value read. Work is split by (sequence, key head) between the caller and the helpers. */
typedef int vi16 __attribute__((vector_size(64), aligned(4)));
#define MAX_GROUP 16
#define MAX_DV 16  /* d up to 256 */
#ifndef ATT_AHEAD
#define ATT_AHEAD 1024  /* floats ahead of the key or value row being read (4 KB; 2-16 KB measured alike) */
#endif

/* e^x for x <= 0 (softmax after the maximum is subtracted), 16 at a time: x = n ln2 + f with n the nearest
   integer and |f| <= ln2 / 2 (Cody-Waite: ln2 in two parts), e^f by its degree-7 Taylor polynomial, 2^n put into
   the exponent bits. Relative error ~1e-7; below -87 it returns e^-87 (~1.6e-38, nothing next to the max's 1). */
static inline v16 vexp(v16 x) {
  const v16 lo = (v16){0} - 87.0f;
  vi16 under = x < lo;
  x = (v16)(((vi16)x & ~under) | ((vi16)lo & under));
  const v16 magic = (v16){0} + 12582912.0f;  /* 1.5 * 2^23: adding it rounds to the nearest integer */
  v16 r = (x * 1.44269504088896341f + magic) - magic;
  v16 f = x - r * 0.693145751953125f - r * 1.428606765330187e-06f;
  v16 p = 1.0f + f * (1.0f + f * (0.5f + f * (1.0f / 6 + f * (1.0f / 24 + f * (1.0f / 120 + f * (1.0f / 720 +
          f * (1.0f / 5040)))))));
  vi16 n = __builtin_convertvector(r, vi16);
  return p * (v16)((n + 127) << 23);
}

typedef struct {
  int hq, hkv, d, cap;
  float scale;
  const float *q, *knew, *vnew;
  float *kc, *vc, *out;
  const int *slots, *lens;
  const float *cos, *sin;  /* (b, d / 2) each: RoPE of the new key and the queries at each row's position, or NULL */
} attn_t;

/* RoPE as mx.fast.rope(traditional=False) over the whole head: x[j] and x[j + d/2] rotated by row i's angle j. */
static inline void rotate(const attn_t* a, int i, const float* x, float* y) {
  const int half = a->d / 2;
  const float *c = a->cos + (size_t)i * half, *s = a->sin + (size_t)i * half;
  for (int j = 0; j < half; j++) {
    const float x0 = x[j], x1 = x[j + half];
    y[j] = x0 * c[j] - x1 * s[j];
    y[j + half] = x1 * c[j] + x0 * s[j];
  }
}
static attn_t attn;  /* the parallel call's arguments (set by the holder of the helpers) */

static void attend_one(const attn_t* a, int task) {
  const int i = task / a->hkv, h = task % a->hkv, G = a->hq / a->hkv, d = a->d, dv = d / 16;
  const size_t base = ((size_t)a->slots[i] * a->hkv + h) * a->cap * d;
  float *K = a->kc + base, *V = a->vc + base;
  const int n = a->lens[i] + 1;
  const float *kn = a->knew + ((size_t)i * a->hkv + h) * d, *vn = a->vnew + ((size_t)i * a->hkv + h) * d;
  if (a->cos) rotate(a, i, kn, K + (size_t)(n - 1) * d);
  else for (int c = 0; c < d; c++) K[(size_t)(n - 1) * d + c] = kn[c];
  for (int c = 0; c < d; c++) V[(size_t)(n - 1) * d + c] = vn[c];
  const int padded = (n + 15) & ~15;
  float* sc = malloc(sizeof(float) * ((size_t)G * padded + (size_t)G * d));
  if (!sc) abort();
  const float* q = a->q + ((size_t)i * a->hq + (size_t)h * G) * d;
  if (a->cos) {  /* the G query heads, rotated, after the scores' space */
    float* qr = sc + (size_t)G * padded;
    for (int g = 0; g < G; g++) rotate(a, i, q + (size_t)g * d, qr + (size_t)g * d);
    q = qr;
  }
  for (int t = 0; t < n; t++) {  /* scores: each key row read once for the G heads */
    const float* k = K + (size_t)t * d;
    for (int c = 0; c < d; c += 16) __builtin_prefetch(k + ATT_AHEAD + c);
    for (int g = 0; g < G; g++) {
      v16 acc = (v16){0};
      for (int c = 0; c < dv; c++) acc += LD(q + (size_t)g * d + 16 * c) * LD(k + 16 * c);
      sc[(size_t)g * padded + t] = hsum(acc) * a->scale;
    }
  }
  float sum[MAX_GROUP];
  for (int g = 0; g < G; g++) {
    float* s = sc + (size_t)g * padded;
    float m = s[0];
    for (int t = 1; t < n; t++) m = s[t] > m ? s[t] : m;
    for (int t = n; t < padded; t++) s[t] = -INFINITY;  /* exp gives 0 past the end */
    v16 acc = (v16){0};
    for (int t = 0; t < padded; t += 16) {
      v16 e = vexp(LD(s + t) - m);
      for (int u = 0; u < 16; u++) s[t + u] = t + u < n ? e[u] : 0.0f;
      acc += LD(s + t);
    }
    sum[g] = hsum(acc);
  }
  v16 o[MAX_GROUP][MAX_DV];
  for (int g = 0; g < G; g++)
    for (int c = 0; c < dv; c++) o[g][c] = (v16){0};
  for (int t = 0; t < n; t++) {  /* probabilities by values: each value row read once for the G heads */
    const float* v = V + (size_t)t * d;
    for (int c = 0; c < d; c += 16) __builtin_prefetch(v + ATT_AHEAD + c);
    for (int g = 0; g < G; g++) {
      const float p = sc[(size_t)g * padded + t];
      for (int c = 0; c < dv; c++) o[g][c] += p * LD(v + 16 * c);
    }
  }
  for (int g = 0; g < G; g++) {
    float* out = a->out + ((size_t)i * a->hq + (size_t)h * G + g) * d;
    const float inv = 1.0f / sum[g];
    for (int c = 0; c < dv; c++)
      for (int u = 0; u < 16; u++) out[16 * c + u] = o[g][c][u] * inv;
  }
  free(sc);
}

static void attend_work(int t0, int t1) {
  for (int t = t0; t < t1; t++) attend_one(&attn, t);
}

/* q: (b, hq, d); knew, vnew: (b, hkv, d); out: (b, hq, d); all C-contiguous fp32. rope_cos, rope_sin: NULL (q and
   knew come rotated) or (b, d / 2) each, to rotate q and knew here. Returns 0, or -1 when the shapes are out of
   this kernel's range (d a multiple of 16 up to 256, hq / hkv whole and up to 16, a position past cap). */
int mlx_distill_attend(int b, int hq, int hkv, int d, int cap, float scale, const float* q, const float* knew,
                       const float* vnew, float* kc, float* vc, const int* slots, const int* lens, float* out,
                       const float* rope_cos, const float* rope_sin) {
  pthread_once(&once, init);
  if (b < 1 || hkv < 1 || hq % hkv || hq / hkv > MAX_GROUP || d % 16 || d / 16 > MAX_DV) return -1;
  for (int i = 0; i < b; i++)
    if (lens[i] < 0 || lens[i] >= cap) return -1;
  if ((rope_cos == NULL) != (rope_sin == NULL)) return -1;
  const attn_t a = {hq, hkv, d, cap, scale, q, knew, vnew, kc, vc, out, slots, lens, rope_cos, rope_sin};
  if (b * hkv > 1 && claim()) {
    attn = a;
    run_parallel(attend_work, b * hkv, 0);
  } else {  /* one core, or another caller holds the helpers: alone */
    for (int t = 0; t < b * hkv; t++) attend_one(&a, t);
  }
  return 0;
}

/* out = silu(gate) * up over n floats (fastdecode's SwiGLU: a decode step's 8 rows x 1536 a layer). MLX 0.32's
   CPU exp is scalar (~9-17 ns an element, ~6 ms of a 44 ms decode step on a 2-core AMD EPYC, 2026-12-06); this is
   vexp, 16 at a time. silu(g) = g / (1 + e^-g) for g >= 0, g e^g / (1 + e^g) below: e^-|g| never overflows. */
void mlx_distill_swiglu(long n, const float* gate, const float* up, float* out) {
  long i = 0;
  for (; i + 16 <= n; i += 16) {
    v16 g = LD(gate + i), u = LD(up + i);
    vi16 neg = g < 0;
    v16 e = vexp((v16)((vi16)g | ((vi16){0} + (int)0x80000000u)));  /* e^-|g|: the sign bit set */
    v16 num = (v16)(((vi16)g & ~neg) | ((vi16)(g * e) & neg));
    v16 r = num / (1.0f + e) * u;
    __builtin_memcpy(out + i, &r, sizeof r);
  }
  for (; i < n; i++) {
    float g = gate[i], e = expf(-fabsf(g));
    out[i] = (g >= 0 ? g : g * e) / (1.0f + e) * up[i];
  }
}

/* Whether this build is for this CPU (-march=native); fastdecode uses the attention kernel only then. */
int mlx_distill_skinny_native(void) { return KERNEL_ON; }

/* How long a helper spins after a job before it sleeps, in microseconds; returns the old setting. fastdecode
   raises it while decoding: its calls come further apart (a Python step between layers), and waking a sleeping
   helper cost ~100 us a call on a 2-core VM. */
long mlx_distill_skinny_set_spin(long us) {
  pthread_once(&once, init);
  long was = __atomic_exchange_n(&spin_ns, us * 1000L, __ATOMIC_RELAXED) / 1000L;
  return was;
}

/* For the benchmarks' in-process A/B and the tests: turn the own kernel on or off; returns the old setting. */
int mlx_distill_skinny_set_kernel(int on) {
  pthread_once(&once, init);
  int was = own;
  own = on;
  return was;
}

void cblas_sgemm(int order, int ta, int tb, int m, int n, int k, float alpha, const float* a, int lda,
                 const float* b, int ldb, float beta, float* c, int ldc) {
  pthread_once(&once, init);
  /* MLX calls row-major x (m x k) @ w: m is the number of tokens; a Linear's weight comes transposed. */
  if (own && m <= kernel_rows && m > 0 && order == 101 && ta == 111 && tb == 112 && k > 0) {
    job_t j = {m, k, lda, ldb, ldc, alpha, beta, a, b, c};
    own_sgemm(&j, n);
    return;
  }
  if (own && m <= kernel_rows && m > 0 && order == 101 && ta == 111 && tb == 111 && n % 16 == 0 && n > 0 &&
      n <= 256) {
    job_t j = {m, k, lda, ldb, ldc, alpha, beta, a, b, c};
    own_nn(&j, n);
    return;
  }
  sgemm_fn f = (small_fn && m <= max_rows) ? small_fn : big_fn;
  f(order, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
