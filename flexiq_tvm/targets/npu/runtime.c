/* FlexiQ NPU simulator runtime (see docs/npu.md).
 *
 * Executes the programs emitted by flexiq_tvm/targets/npu/codegen.py bit-exactly and counts
 * cycles.  The functional part works on simulated SRAM banks (IBUF / WBUF / OBUF, two banks each
 * for double buffering) filled by DMA instructions; the GEMM instruction computes the literal
 * FlexiQ mixed dot product of METHOD section 2: 8x8-bit MACs on INT8 codes for high channel runs,
 * dual 4x4-bit MACs on 4-bit codes clamp((q + (1<<e>>1)) >> e) for low runs, whose partial sums
 * are shifted by e_w[o,g] + e_x[g] in the PE accumulator.  Whether a run is low comes from the
 * per-layer K4 register, loaded from the run-time `counts` tensor by LDREG: the program itself
 * never depends on the ratio.
 *
 * The timing part is a scoreboard: one DMA engine, one systolic array, one vector unit; every bank
 * has a ready time (data valid) and a free time (last reader done), so loads into one bank overlap
 * compute on the other (double buffering).  Per layer it records busy cycles of each unit and the
 * span between LDREG and SYNC.
 *
 * This file is the fixed part; the codegen appends the constant blob, the layer table, the
 * programs and one exported tvm-ffi function per external Relax function.
 */
#pragma GCC optimize("fp-contract=off")
#include <tvm/ffi/c_api.h>
#include <dlpack/dlpack.h>
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifdef __cplusplus
extern "C" {
#endif

enum { OP_LDREG = 1, OP_QUANT = 2, OP_LDX = 3, OP_LDW = 4, OP_GEMM = 5, OP_VEC = 6, OP_ST = 7, OP_SYNC = 8,
       OP_DWGEMM = 9, OP_PREF = 10, OP_ADD = 11 };
#define NPU_IW 12          /* int32 words per instruction */
#define NPU_MAX_REQ 8
#define NPU_MAX_VAR 9      /* mapping variants per layer (LDREG words 3..11) */

typedef struct {
  int32_t layer;                              /* flexiq.layer: index into counts and the stats table */
  int32_t N, C, H, W, O, OH, OW, KH, KW, SH, SW, DH, DW, PT, PL, Hp, Wp, groups, Cg, opg;
  int32_t is_unsigned, act, n_groups;         /* act: 0 none, 1 clamp(y, act_lo, act_hi) (ReLU, ReLU6) */
  float act_scale, act_lo, act_hi;
  int64_t w_off;      /* int8: [groups][opg][Cg][KH][KW] (input channels in lowering order);
                         depthwise: [C][KH][KW], channels in lowering order */
  int64_t chan_off;   /* int32 [groups][Cg] (depthwise: [C]): channel at sorted position j */
  int64_t rank_off;   /* int32, same shape: lowering group (rank) of sorted position j */
  int64_t ex_off;     /* int32 [n_groups]: activation shift per group (dynamic: offset below the live rule) */
  int64_t ew_off;     /* int32 [O][n_groups]: weight shift per (output channel, group) */
  int64_t scale_off;  /* f32 [O] */
  int64_t bias_off;   /* f32 [bias_rows][O]: row 0 the model's bias, then one per corrected ratio level */
  int64_t sel_off;    /* int32 [n_groups + 1]: mapping variant per value of K4 */
  int32_t bias_rows, depthwise, dynamic, samples;
  int32_t in_param;   /* >= 0: the float input is function argument in_param (quantized by QUANT) */
  int32_t out_index;  /* >= 0: the float result goes to DPS output out_index */
  int32_t in_onchip;  /* the INT8 input codes live in the activation SRAM (ABUF), not in DRAM */
  int32_t n_req;      /* internal consumers: requantized INT8 copies in the consumers' input buffers */
  int32_t req_layer[NPU_MAX_REQ];
  int32_t n_fadd;     /* float copies for residual adds, each add * 2 + operand */
  int32_t fadd[NPU_MAX_REQ];
} npu_layer_t;

/* a residual add a + b of two float32 tensors on the vector unit, or (pool > 0) a global average
   pool: operand 0 holds n x pool values, out[i] = (sum_j in[i * pool + j], in order) / pool */
typedef struct {
  int32_t n;                    /* elements */
  int32_t act;                  /* fused ReLU / ReLU6: clamp(a + b, act_lo, act_hi) */
  float act_lo, act_hi;
  int32_t in_param[2];          /* >= 0: operand k is that function argument (host float, DRAM) */
  int32_t onchip[2];            /* operand k's float copy lives in the ABUF (else DRAM) */
  int32_t out_index;            /* >= 0: the sum goes to DPS output out_index */
  int32_t n_req;                /* layers reading a requantized INT8 copy */
  int32_t req_layer[NPU_MAX_REQ];
  int32_t n_fadd;               /* adds reading a float copy */
  int32_t fadd[NPU_MAX_REQ];
  int32_t pool;                 /* 0: add; > 0: global average pool over `pool` positions per output */
  /* vector-unit / mover operators of token tensors (kind > 0, docs/npu.md section 4.3) */
  int32_t kind;                 /* 0: the residual add / pool above; else NPU_V_* */
  int64_t n_op[2];              /* elements of operand k (0: unused) */
  int64_t c_off[2];             /* >= 0: operand k is a float32 constant in the blob */
  int64_t p_off;                /* float32 parameters in the blob (layer norm: gamma[D], beta[D]) */
  float s;                      /* scalar operand (ADDS, MULS, DIVS) or epsilon (LN) */
  int32_t nd;                   /* GATHER: output rank */
  int64_t d[8];                 /* kind-specific sizes (GATHER: output dims) */
  int64_t g[8];                 /* GATHER: operand element stride per output dim */
  int64_t g0;                   /* GATHER: operand base offset */
  int32_t chain;                /* elementwise, fed only by the operator just before it: chained in its pass */
} npu_add_t;

enum { NPU_V_COPY = 1, NPU_V_ADD = 2, NPU_V_MUL = 3, NPU_V_ADDS = 4, NPU_V_MULS = 5, NPU_V_DIVS = 6,
       NPU_V_ERF = 7, NPU_V_LN = 8, NPU_V_SOFTMAX = 9, NPU_V_MATMUL = 10, NPU_V_GATHER = 11, NPU_V_CONCAT = 12 };

typedef struct {
  const npu_layer_t* layers;   /* program-local layer table */
  int32_t n_layers;
  const int32_t* code;         /* NPU_IW words per instruction */
  int32_t n_instr;
  int32_t n_params, n_outputs, counts_param, bias_param;
  const npu_add_t* adds;
  int32_t n_adds;
  int32_t resident;            /* the weights of every program stay in the WBUF between calls */
  int64_t weight_load;         /* cycles of the one-time weight load (program load, first call) */
  int32_t* loaded;             /* set once the resident weights are in the WBUF */
} npu_program_t;

/* ---- configuration (filled by the codegen) ---- */
typedef struct {
  int32_t rows, cols, ibuf, wbuf, obuf, abuf, dma_bw, dma_setup, sram_bw, lanes, fill, drain;
  double clock_mhz;
} npu_config_t;

#define NPU_STATS_COLS 16
/* stats row (one per flexiq layer): valid, total, compute, dma, vector, macs8, macs4,
 * ibuf_max, wbuf_max, obuf_max, gemm_instr, k4, variant, spill, dram_bytes, onchip_in */

/* ---- helpers ---- */
static DLTensor* npu_arg_tensor(const TVMFFIAny* a) {
  if (a->type_index == kTVMFFIDLTensorPtr) return (DLTensor*)a->v_ptr;
  if (a->type_index == kTVMFFITensor) return (DLTensor*)((char*)a->v_obj + sizeof(TVMFFIObject));
  return NULL;
}
static int npu_fail(const char* msg) {
  TVMFFIErrorSetRaisedFromCStr("RuntimeError", msg);
  return -1;
}
static inline int64_t npu_max64(int64_t a, int64_t b) { return a > b ? a : b; }
static inline int32_t npu_code4(int32_t q, int32_t e, int32_t lo, int32_t hi) {
  int32_t v = (q + ((1 << e) >> 1)) >> e;          /* arithmetic shift, rounding half up */
  return v < lo ? lo : (v > hi ? hi : v);
}
static inline int32_t npu_quant(float x, float s, int32_t lo, int32_t hi) {
  float v = floorf(x / s + 0.5f);
  if (v > (float)hi) v = (float)hi;
  if (v < (float)lo) v = (float)lo;
  return (int32_t)v;
}
static inline int64_t npu_ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

/* A finished float value goes to every on-NPU consumer: requantized into each consumer layer's INT8
   input (with that layer's scale and signedness), and as a float copy for each residual add. */
static inline void npu_fan_out(const npu_program_t* P, int8_t** qin, float** fin, int32_t n_req,
                               const int32_t* req_layer, int32_t n_fadd, const int32_t* fadd, int64_t idx,
                               float v) {
  for (int c = 0; c < n_req; ++c) {
    const npu_layer_t* Lc = &P->layers[req_layer[c]];
    int32_t clo = Lc->is_unsigned ? 0 : -127, chi = Lc->is_unsigned ? 255 : 127;
    qin[req_layer[c]][idx] = (int8_t)npu_quant(v, Lc->act_scale, clo, chi);
  }
  for (int c = 0; c < n_fadd; ++c) fin[fadd[c]][idx] = v;
}

typedef struct { int32_t gi, n0, nlen, oh0, ohlen, j0, jlen, rows, hp0; } npu_xmeta_t;
typedef struct { int32_t gi, o0, olen, j0, jlen; } npu_wmeta_t;
typedef struct { int32_t gi, n0, nlen, oh0, ohlen, o0, olen; } npu_ometa_t;

typedef struct {
  int64_t dma_free, arr_free, vec_free;
  int64_t x_ready[2], x_free[2], w_ready[2], w_free[2], o_ready[2], o_free[2];
} npu_clock_t;

/* per-layer run-time state */
typedef struct {
  int32_t k4, brow, variant, wflip, prefetched, pref_instr;
  int64_t in_ready;      /* the layer's INT8 input is complete (QUANT or producers' ST) */
  int64_t last_end;      /* latest end of an instruction of this layer */
  int32_t* exd;          /* dynamic extraction: [samples][n_groups] shifts */
} npu_lstate_t;

/* A result's consumers (a layer's or an operator's req / fadd lists, as npu_fan_out takes them):
   DRAM bytes per element of the copies that do not stay on chip (1 per INT8 copy, 4 per float copy) */
static inline int64_t npu_offchip_bytes_per_elem(const npu_program_t* P, int32_t n_req, const int32_t* req_layer,
                                                 int32_t n_fadd, const int32_t* fadd) {
  int64_t b = 0;
  for (int c = 0; c < n_req; ++c) b += P->layers[req_layer[c]].in_onchip ? 0 : 1;
  for (int c = 0; c < n_fadd; ++c) b += P->adds[fadd[c] / 2].onchip[fadd[c] % 2] ? 0 : 4;
  return b;
}

/* consumer layers with dynamic extraction (each costs one more pass: its max tracking) */
static inline int npu_dynamic_consumers(const npu_program_t* P, int32_t n_req, const int32_t* req_layer) {
  int n = 0;
  for (int c = 0; c < n_req; ++c) n += P->layers[req_layer[c]].dynamic;
  return n;
}

/* the result is complete at cycle t: every consumer's input is ready no earlier */
static inline void npu_consumers_ready(npu_lstate_t* ls, int64_t* add_ready, int32_t n_req, const int32_t* req_layer,
                                       int32_t n_fadd, const int32_t* fadd, int64_t t) {
  for (int c = 0; c < n_req; ++c) ls[req_layer[c]].in_ready = npu_max64(ls[req_layer[c]].in_ready, t);
  for (int c = 0; c < n_fadd; ++c) add_ready[fadd[c] / 2] = npu_max64(add_ready[fadd[c] / 2], t);
}

static inline int32_t npu_shift_of(int32_t m, int is_unsigned) {
  static const int32_t ts[4] = {8, 16, 32, 64}, tu[4] = {16, 32, 64, 128};
  const int32_t* t = is_unsigned ? tu : ts;
  int32_t e = 0;
  for (int i = 0; i < 4; ++i) e += (m >= t[i]);
  return e;
}

/* Dynamic extraction: per (sample, group) max |code| of the live input (tracked by the vector unit
 * while the codes are written: QUANT or the producer's requantizing ST), shift = clamp(rule(m) -
 * offset[g], 0); the rule counts the thresholds 8/16/32/64 (unsigned: 16/32/64/128) that m reaches. */
static void npu_dynamic_shifts(const npu_layer_t* L, const int8_t* q, int32_t* exd, const unsigned char* blob) {
  const int32_t* rank = (const int32_t*)(blob + L->rank_off);
  const int32_t* chan = (const int32_t*)(blob + L->chan_off);
  const int32_t* off = (const int32_t*)(blob + L->ex_off);
  int64_t rows_ps = L->N / L->samples;
  for (int s = 0; s < L->samples; ++s) {
    int32_t* e = exd + (int64_t)s * L->n_groups;
    for (int g = 0; g < L->n_groups; ++g) e[g] = 0;
    for (int j = 0; j < L->C; ++j) {          /* sorted position j of the (flattened) channel tables */
      int32_t r = rank[j];
      int64_t c = L->depthwise ? chan[j] : (int64_t)(j / L->Cg) * L->Cg + chan[j];
      if (r < 0 || r >= L->n_groups) continue;
      int32_t m = e[r];
      for (int64_t rr = 0; rr < rows_ps; ++rr) {
        const int8_t* p = q + (((int64_t)s * rows_ps + rr) * L->C + c) * L->H * L->W;
        for (int64_t i = 0; i < (int64_t)L->H * L->W; ++i) {
          int32_t v = L->is_unsigned ? (int32_t)(uint8_t)p[i] : (int32_t)p[i];
          if (v < 0) v = -v;
          if (v > m) m = v;
        }
      }
      e[r] = m;
    }
    for (int g = 0; g < L->n_groups; ++g) {
      int32_t v = npu_shift_of(e[g], L->is_unsigned) - off[g];
      e[g] = v < 0 ? 0 : v;
    }
  }
}

/* ---- vector-unit operators of token tensors (docs/npu.md section 4.3) ----
 * Each one reproduces the operation order and roundings of the TVM llvm kernel that the host would
 * run (topi after LegalizeOps, lowered by TVM's LLVM codegen), so the results are bit-exact:
 *   - reductions run sequentially in index order from 0 (one lane per row / output, the reduction
 *     axis in time), as the unscheduled host loops do;
 *   - `acc + a * b` is one fused multiply-add (TVM's LowerIntrin turns an Add of a Mul into
 *     llvm.fmuladd, an FMA on the host), everything else rounds per operation (fp-contract=off);
 *   - exp and erf are the C library's expf / erff, the functions the host kernels call. */
#ifndef NPU_HOST_FMA
#define NPU_HOST_FMA 1
#endif
/* llvm.fmuladd as the host executes it: one rounding on an FMA host, two without FMA */
static inline float npu_fmuladd(float a, float b, float c) {
#if NPU_HOST_FMA
  return fmaf(a, b, c);
#else
  float p = a * b;
  return p + c;
#endif
}

static void npu_vec_compute(const npu_add_t* A, const float* a, const float* b, const unsigned char* blob,
                            float* out) {
  const int64_t n = A->n;
  switch (A->kind) {
    case NPU_V_COPY: memcpy(out, a, sizeof(float) * n); break;
    case NPU_V_ADD: for (int64_t i = 0; i < n; ++i) out[i] = a[i] + b[i]; break;
    case NPU_V_MUL: for (int64_t i = 0; i < n; ++i) out[i] = a[i] * b[i]; break;
    case NPU_V_ADDS: for (int64_t i = 0; i < n; ++i) out[i] = a[i] + A->s; break;
    case NPU_V_MULS: for (int64_t i = 0; i < n; ++i) out[i] = a[i] * A->s; break;
    case NPU_V_DIVS: for (int64_t i = 0; i < n; ++i) out[i] = a[i] / A->s; break;
    case NPU_V_ERF: for (int64_t i = 0; i < n; ++i) out[i] = erff(a[i]); break;
    case NPU_V_LN: {                         /* topi layer_norm: sum, mean, sum of squared deviations */
      const int64_t rows = A->d[0], D = A->d[1];
      const float* gamma = (const float*)(blob + A->p_off);
      const float* beta = gamma + D;
      for (int64_t r = 0; r < rows; ++r) {
        const float* x = a + r * D;
        float sum = 0.0f;
        for (int64_t k = 0; k < D; ++k) sum = sum + x[k];
        float mean = sum / (float)D;
        float vs = 0.0f;
        for (int64_t k = 0; k < D; ++k) { float dx = x[k] - mean; vs = npu_fmuladd(dx, dx, vs); }
        float rs = 1.0f / sqrtf(vs / (float)D + A->s);          /* rsqrt lowers to 1 / sqrt */
        for (int64_t k = 0; k < D; ++k) out[r * D + k] = npu_fmuladd((x[k] - mean) * rs, gamma[k], beta[k]);
      }
      break;
    }
    case NPU_V_SOFTMAX: {                    /* topi softmax: row max, exp(x - max), sum, divide */
      const int64_t rows = A->d[0], D = A->d[1];
      for (int64_t r = 0; r < rows; ++r) {
        const float* x = a + r * D;
        float* y = out + r * D;
        float m = -FLT_MAX;
        for (int64_t k = 0; k < D; ++k) m = x[k] > m ? x[k] : m;
        for (int64_t k = 0; k < D; ++k) y[k] = expf(x[k] - m);
        float sum = 0.0f;
        for (int64_t k = 0; k < D; ++k) sum = sum + y[k];
        for (int64_t k = 0; k < D; ++k) y[k] = y[k] / sum;
      }
      break;
    }
    case NPU_V_MATMUL: {                     /* [B, M, K] x [B, K, N], float32, FMA per step, k ascending */
      const int64_t B = A->d[0], M = A->d[1], K = A->d[2], N = A->d[3];
      for (int64_t bb = 0; bb < B; ++bb)
        for (int64_t i = 0; i < M; ++i)
          for (int64_t j = 0; j < N; ++j) {
            const float* x = a + (bb * M + i) * K;
            const float* w = b + bb * K * N + j;
            float acc = 0.0f;
            for (int64_t k = 0; k < K; ++k) acc = npu_fmuladd(x[k], w[k * N], acc);
            out[(bb * M + i) * N + j] = acc;
          }
      break;
    }
    case NPU_V_GATHER: {                     /* permute / constant take / broadcast: pure addressing */
      int64_t idx[8] = {0};
      for (int64_t i = 0; i < n; ++i) {
        int64_t off = A->g0;
        for (int k = 0; k < A->nd; ++k) off += idx[k] * A->g[k];
        out[i] = a[off];
        for (int k = A->nd - 1; k >= 0; --k) { if (++idx[k] < A->d[k]) break; idx[k] = 0; }
      }
      break;
    }
    case NPU_V_CONCAT: {                     /* [outer][na | nb][inner] */
      const int64_t outer = A->d[0], na = A->d[1], nb = A->d[2], inner = A->d[3];
      for (int64_t o = 0; o < outer; ++o) {
        memcpy(out + o * (na + nb) * inner, a + o * na * inner, sizeof(float) * na * inner);
        memcpy(out + (o * (na + nb) + na) * inner, b + o * nb * inner, sizeof(float) * nb * inner);
      }
      break;
    }
    default: break;
  }
}

#define NPU_SFU 4        /* exp / erf / 1/sqrt: lanes / 4 results per cycle (pipelined special functions) */

/* Vector-unit cycles of one operator, before its copies (docs/npu.md section 4.3). A row reduction
 * keeps one row per lane and the reduction axis in time (the host's sequential order); a float
 * matmul keeps one output per lane and K in time (vector_lanes MACs per cycle). */
static int64_t npu_vec_cycles(const npu_add_t* A, const npu_config_t* cfg) {
  const int64_t l = cfg->lanes, pass = npu_ceil_div(A->n, cfg->lanes);
  switch (A->kind) {
    case NPU_V_COPY: return 0;                                      /* a view: same bytes, new shape */
    case NPU_V_ADD: case NPU_V_MUL: case NPU_V_ADDS: case NPU_V_MULS: case NPU_V_DIVS: return pass;
    case NPU_V_ERF: return NPU_SFU * pass;
    case NPU_V_LN: {
      int64_t rp = npu_ceil_div(A->d[0], l);
      return 2 * rp * A->d[1] + NPU_SFU * rp + pass;               /* sum, squares, 1/sqrt, normalize */
    }
    case NPU_V_SOFTMAX: {
      int64_t rp = npu_ceil_div(A->d[0], l);
      return rp * A->d[1] + NPU_SFU * pass + rp * A->d[1] + pass;  /* max, exp, sum, divide */
    }
    case NPU_V_MATMUL: return npu_ceil_div(A->d[0] * A->d[1] * A->d[3], l) * A->d[2];
    default: return 0;                      /* GATHER / CONCAT: an address pattern of the consumers' reads */
  }
}

/* The interpreter.  blob: constants; cfg: the array; stats: [n_stats][NPU_STATS_COLS]. */
static int npu_run(const npu_program_t* P, const unsigned char* blob, const npu_config_t* cfg,
                   double* stats, int32_t n_stats, const TVMFFIAny* args, int32_t num_args) {
  if (num_args != P->n_params + P->n_outputs) return npu_fail("flexiq_npu: wrong number of arguments");
  DLTensor* T[64];
  if (num_args > 64) return npu_fail("flexiq_npu: too many arguments");
  for (int i = 0; i < num_args; ++i) {
    T[i] = npu_arg_tensor(&args[i]);
    if (!T[i]) return npu_fail("flexiq_npu: argument is not a tensor");
  }
  const int32_t* counts = NULL;
  int64_t n_counts = 0;
  if (P->counts_param >= 0) {
    counts = (const int32_t*)((const char*)T[P->counts_param]->data + T[P->counts_param]->byte_offset);
    n_counts = T[P->counts_param]->shape[0];
  }
  int32_t bias_row_arg = 0;
  if (P->bias_param >= 0)
    bias_row_arg = *(const int32_t*)((const char*)T[P->bias_param]->data + T[P->bias_param]->byte_offset);

  /* resident weights: loaded once, when the program is loaded (its first call); the load is
     reported in the header row (not in the per-inference cycles) */
  if (n_stats >= 0) {
    int loaded_now = 0;
    if (P->resident && P->loaded && !*P->loaded) { *P->loaded = 1; loaded_now = 1; }
    stats[14] = (double)(P->resident ? P->weight_load : 0);
    stats[15] = (double)(P->resident + 2 * loaded_now);
  }
  const int64_t IB = cfg->ibuf / 2, WB = cfg->wbuf / 2, OB = cfg->obuf / 2;
  int8_t* ibuf[2] = {(int8_t*)malloc(IB), (int8_t*)malloc(IB)};
  int8_t* wbuf[2] = {(int8_t*)malloc(WB), (int8_t*)malloc(WB)};
  int32_t* obuf[2] = {(int32_t*)malloc(OB), (int32_t*)malloc(OB)};
  int8_t* xcode = (int8_t*)malloc(IB);     /* feeder's bit-extracted copy of the IBUF tile */
  int8_t* wcode = (int8_t*)malloc(WB);     /* weight loader's bit-extracted copy of the WBUF tile */
  int8_t** qin = (int8_t**)calloc(P->n_layers, sizeof(int8_t*));   /* layer inputs (DRAM or ABUF) */
  npu_lstate_t* ls = (npu_lstate_t*)calloc(P->n_layers, sizeof(npu_lstate_t));
  float** fin = (float**)calloc(2 * P->n_adds + 1, sizeof(float*));   /* add operands (ABUF or DRAM) */
  int64_t* add_ready = (int64_t*)calloc(P->n_adds + 1, sizeof(int64_t));
  int ok = ibuf[0] && ibuf[1] && wbuf[0] && wbuf[1] && obuf[0] && obuf[1] && xcode && wcode && qin && ls && fin && add_ready;
  for (int a = 0; ok && a < 2 * P->n_adds; ++a) {
    fin[a] = (float*)malloc(sizeof(float) * (P->adds[a / 2].n_op[a % 2] > 0 ? P->adds[a / 2].n_op[a % 2] : 1));
    if (!fin[a]) ok = 0;
  }
  for (int l = 0; ok && l < P->n_layers; ++l) {
    const npu_layer_t* L = &P->layers[l];
    qin[l] = (int8_t*)malloc((size_t)L->N * L->C * L->H * L->W);
    if (!qin[l]) ok = 0;
    if (L->dynamic) { ls[l].exd = (int32_t*)malloc(sizeof(int32_t) * L->samples * L->n_groups); if (!ls[l].exd) ok = 0; }
  }
  const char* err = ok ? NULL : "flexiq_npu: out of host memory";
  npu_xmeta_t xm[2];
  npu_wmeta_t wm[2];
  npu_ometa_t om[2];
  memset(xm, 0, sizeof xm); memset(wm, 0, sizeof wm); memset(om, 0, sizeof om);
  npu_clock_t tc;
  memset(&tc, 0, sizeof tc);
  int64_t prev_end = 0, add_end = 0, add_dma = 0, add_vec = 0, add_bytes = 0, chain_max = 0;
  double* last_st = NULL;
  int32_t last_gemm_wbank = 0;
  const int32_t R = cfg->rows, Ccols = cfg->cols;

  for (int32_t pc = 0; !err && pc < P->n_instr; ++pc) {
    const int32_t* I = P->code + (int64_t)pc * NPU_IW;
    if (I[0] == OP_ADD && P->adds[I[1]].kind > 0) {   /* token-tensor operator (vector unit / mover) */
      const npu_add_t* A = &P->adds[I[1]];
      const float* src[2] = {NULL, NULL};
      int64_t bytes = 0;                     /* DRAM traffic of this operator */
      for (int k = 0; k < 2; ++k) {
        if (A->n_op[k] <= 0) continue;
        if (A->c_off[k] >= 0) {              /* a constant: loaded with the weights */
          src[k] = (const float*)(blob + A->c_off[k]);
          if (!P->resident) bytes += 4 * A->n_op[k];
        } else if (A->in_param[k] >= 0) {
          src[k] = (const float*)((const char*)T[A->in_param[k]]->data + T[A->in_param[k]]->byte_offset);
          bytes += 4 * A->n_op[k];
        } else {
          src[k] = fin[2 * I[1] + k];
          if (!A->onchip[k]) bytes += 4 * A->n_op[k];
        }
      }
      if (A->kind == NPU_V_LN && !P->resident) bytes += 8 * A->d[1];
      float* y = NULL;
      if (A->out_index >= 0) {
        DLTensor* Y = T[P->n_params + A->out_index];
        y = (float*)((char*)Y->data + Y->byte_offset);
      }
      float* r = y ? y : (float*)malloc(sizeof(float) * (A->n > 0 ? A->n : 1));
      if (!r) { err = "flexiq_npu: out of host memory"; break; }
      npu_vec_compute(A, src[0], src[1], blob, r);
      for (int64_t i = 0; i < A->n; ++i)
        npu_fan_out(P, qin, fin, A->n_req, A->req_layer, A->n_fadd, A->fadd, i, r[i]);
      if (!y) free(r);
      if (y) bytes += 4 * (int64_t)A->n;
      bytes += A->n * npu_offchip_bytes_per_elem(P, A->n_req, A->req_layer, A->n_fadd, A->fadd);
      const int n_dyn = npu_dynamic_consumers(P, A->n_req, A->req_layer);
      /* one pass writes the result: the float tensor in the ABUF, read in place by every float
         consumer (a reshape / transpose / slice / concat is only the address pattern its
         consumers read with), and the first requantized INT8 copy; each further INT8 copy and
         each dynamic consumer's max tracking is one more pass */
      const int64_t pass = npu_ceil_div(A->n, cfg->lanes);
      const int64_t own = npu_vec_cycles(A, cfg);
      /* chaining: an elementwise operator whose input streams out of the operator just before it
         (its only consumer) is another stage of the same pipelined pass: the chain runs at the
         rate of its slowest stage */
      int64_t own_t = own;
      if (A->chain) { own_t = own > chain_max ? own - chain_max : 0; if (own > chain_max) chain_max = own; }
      else chain_max = own;
      int64_t extra = A->n_req + n_dyn - ((own > 0 || A->chain) && A->n_req > 0 ? 1 : 0);
      int64_t v = own_t + pass * (extra > 0 ? extra : 0);
      int64_t d = bytes ? cfg->dma_setup + npu_ceil_div(bytes, cfg->dma_bw) : 0;
      int64_t s0 = npu_max64(add_ready[I[1]], v ? tc.vec_free : 0);
      if (d) s0 = npu_max64(s0, tc.dma_free);
      int64_t e = s0 + npu_max64(v, d);
      if (v) tc.vec_free = e;
      if (d) tc.dma_free = e;
      npu_consumers_ready(ls, add_ready, A->n_req, A->req_layer, A->n_fadd, A->fadd, e);
      add_end = npu_max64(add_end, e);
      add_dma += d; add_vec += v; add_bytes += bytes;   /* reported with the layer after the operator */
      continue;
    }
    if (I[0] == OP_ADD) {                    /* residual add on the vector unit (float32, exact) */
      const npu_add_t* A = &P->adds[I[1]];
      const float* src[2];
      for (int k = 0; k < 2; ++k)
        src[k] = A->in_param[k] >= 0 ? (const float*)((const char*)T[A->in_param[k]]->data + T[A->in_param[k]]->byte_offset)
                                     : fin[2 * I[1] + k];
      float* y = NULL;
      if (A->out_index >= 0) {
        DLTensor* Y = T[P->n_params + A->out_index];
        y = (float*)((char*)Y->data + Y->byte_offset);
      }
      const int64_t pin = A->pool > 0 ? A->pool : 1, n_in = A->n * pin;
      const int n_ops = A->pool > 0 ? 1 : 2;
      for (int64_t i = 0; i < A->n; ++i) {
        float v;
        if (A->pool > 0) {                   /* host order: float32 sum over positions, then / count */
          float acc = 0.0f;
          for (int64_t j = 0; j < pin; ++j) acc = acc + src[0][i * pin + j];
          v = acc / (float)A->pool;
        } else {
          v = src[0][i] + src[1][i];
        }
        if (A->act) { if (v < A->act_lo) v = A->act_lo; if (v > A->act_hi) v = A->act_hi; }
        if (y) y[i] = v;
        npu_fan_out(P, qin, fin, A->n_req, A->req_layer, A->n_fadd, A->fadd, i, v);
      }
      int64_t bytes = 0;                     /* DRAM traffic: operands not on chip, host output, spilled copies */
      for (int k = 0; k < n_ops; ++k) bytes += A->onchip[k] ? 0 : 4 * n_in;
      if (y) bytes += 4 * (int64_t)A->n;
      bytes += A->n * npu_offchip_bytes_per_elem(P, A->n_req, A->req_layer, A->n_fadd, A->fadd);
      const int n_dyn = npu_dynamic_consumers(P, A->n_req, A->req_layer);
      /* one pipelined pass over the inputs (the add, or the pool's running sums), one per further copy */
      int64_t v = npu_ceil_div(n_in, cfg->lanes) + npu_ceil_div(A->n, cfg->lanes) * (A->n_req + n_dyn + A->n_fadd);
      int64_t d = bytes ? cfg->dma_setup + npu_ceil_div(bytes, cfg->dma_bw) : 0;
      int64_t s0 = npu_max64(npu_max64(tc.vec_free, add_ready[I[1]]), bytes ? tc.dma_free : 0);
      int64_t e = s0 + npu_max64(v, d);
      tc.vec_free = e;
      if (bytes) tc.dma_free = e;
      npu_consumers_ready(ls, add_ready, A->n_req, A->req_layer, A->n_fadd, A->fadd, e);
      add_end = npu_max64(add_end, e);
      add_dma += d; add_vec += v; add_bytes += bytes;   /* reported with the layer after the add */
      continue;
    }
    const int32_t li = I[1];
    const npu_layer_t* L = &P->layers[li];
    npu_lstate_t* S = &ls[li];
    double* st = (L->layer < n_stats) ? stats + (int64_t)(L->layer + 1) * NPU_STATS_COLS : NULL;
    const int32_t lo = L->is_unsigned ? 0 : -127, hi = L->is_unsigned ? 255 : 127;
    const int32_t lo4 = L->is_unsigned ? 0 : -8, hi4 = L->is_unsigned ? 15 : 7;
    const int32_t KK = L->KH * L->KW;
    switch (I[0]) {
      case OP_LDREG: {                       /* K4 <- counts[layer]; bias row; mapping variant; jump */
        if (L->layer >= n_counts) { err = "flexiq_npu: counts tensor too short"; break; }
        int32_t k4 = counts[L->layer];
        if (k4 < 0 || k4 > L->n_groups) { err = "flexiq_npu: count of 4-bit groups out of range"; break; }
        S->k4 = k4;
        S->brow = bias_row_arg < 0 ? 0 : (bias_row_arg >= L->bias_rows ? L->bias_rows - 1 : bias_row_arg);
        S->variant = ((const int32_t*)(blob + L->sel_off))[k4];
        if (S->variant < 0 || S->variant >= I[2]) { err = "flexiq_npu: bad mapping variant"; break; }
        if (st) {
          double keep_dma = st[3], keep_bytes = st[14], keep_w = st[8];   /* a PREF may have counted already */
          memset(st, 0, sizeof(double) * NPU_STATS_COLS);
          st[0] = 1; st[11] = k4; st[12] = S->variant;
          if (S->prefetched) { st[3] = keep_dma; st[14] = keep_bytes; st[8] = keep_w; }
          st[15] = L->in_onchip;
        }
        if (L->dynamic && L->in_param < 0) npu_dynamic_shifts(L, qin[li], S->exd, blob);
        pc = I[3 + S->variant] - 1;          /* jump to the selected mapping */
        break;
      }
      case OP_QUANT: {                       /* float input -> INT8 codes (vector unit, streamed) */
        const DLTensor* X = T[I[2]];
        const float* xf = (const float*)((const char*)X->data + X->byte_offset);
        int64_t n = (int64_t)L->N * L->C * L->H * L->W;
        int8_t* q = qin[li];
        for (int64_t i = 0; i < n; ++i) q[i] = (int8_t)npu_quant(xf[i], L->act_scale, lo, hi);
        if (L->dynamic) npu_dynamic_shifts(L, q, S->exd, blob);
        /* DRAM read of the float input (+ write of the codes when they do not stay on chip) */
        int64_t bytes = n * (L->in_onchip ? 4 : 5);
        int64_t d = cfg->dma_setup + npu_ceil_div(bytes, cfg->dma_bw);
        int64_t v = npu_ceil_div(n, cfg->lanes) * (L->dynamic ? 2 : 1);
        int64_t s = npu_max64(tc.dma_free, tc.vec_free), e = s + npu_max64(d, v);
        tc.dma_free = tc.vec_free = e;
        S->in_ready = npu_max64(S->in_ready, e);
        S->last_end = npu_max64(S->last_end, e);
        if (st) { st[3] += d; st[4] += v; st[14] += bytes; }
        break;
      }
      case OP_LDX: {                         /* activation patch -> IBUF bank (zero padding by the mover) */
        int b = I[2];
        npu_xmeta_t m = {I[3], I[4], I[5], I[6], I[7], I[8], I[9], 0, 0};
        m.rows = (m.ohlen - 1) * L->SH + (L->KH - 1) * L->DH + 1;
        m.hp0 = m.oh0 * L->SH;
        int64_t bytes = (int64_t)m.nlen * m.jlen * m.rows * L->Wp;
        if (bytes > IB) { err = "flexiq_npu: IBUF overflow (codegen tiling bug)"; break; }
        const int32_t* chan = (const int32_t*)(blob + L->chan_off) + (m.gi >= 0 ? (int64_t)m.gi * L->Cg : 0);
        int8_t* dst = ibuf[b];
        const int8_t* src = qin[li];
        for (int n = 0; n < m.nlen; ++n)
          for (int j = 0; j < m.jlen; ++j) {
            int64_t c = m.gi >= 0 ? (int64_t)m.gi * L->Cg + chan[m.j0 + j] : chan[m.j0 + j];
            const int8_t* plane = src + (((int64_t)(m.n0 + n) * L->C + c) * L->H) * L->W;
            for (int r = 0; r < m.rows; ++r) {
              int h = m.hp0 + r - L->PT;
              int8_t* row = dst + (((int64_t)n * m.jlen + j) * m.rows + r) * L->Wp;
              if (h < 0 || h >= L->H) { memset(row, 0, L->Wp); continue; }
              for (int w = 0; w < L->Wp; ++w) {
                int ww = w - L->PL;
                row[w] = (ww < 0 || ww >= L->W) ? 0 : plane[(int64_t)h * L->W + ww];
              }
            }
          }
        xm[b] = m;
        int64_t s = npu_max64(npu_max64(tc.dma_free, tc.x_free[b]), S->in_ready);
        int64_t d = L->in_onchip ? 2 + npu_ceil_div(bytes, cfg->sram_bw)          /* ABUF -> IBUF */
                                 : cfg->dma_setup + npu_ceil_div(bytes, cfg->dma_bw);
        tc.dma_free = s + d; tc.x_ready[b] = s + d;
        S->last_end = npu_max64(S->last_end, s + d);
        if (st) { st[3] += d; if (bytes > st[7]) st[7] = (double)bytes; if (!L->in_onchip) st[14] += bytes; }
        break;
      }
      case OP_PREF:                          /* the next layer's first weight tile, during this layer */
      case OP_LDW: {                         /* INT8 weights (lowering order) -> WBUF bank */
        const int32_t* J = I;
        int32_t tl = li;
        if (I[0] == OP_PREF) {
          /* I[2]: slot of the next layer, I[3]: pc of its LDREG; its selected variant starts with LDW */
          tl = I[2];
          const npu_layer_t* Ln = &P->layers[tl];
          if (Ln->layer >= n_counts) { err = "flexiq_npu: counts tensor too short"; break; }
          int32_t k = counts[Ln->layer];
          if (k < 0 || k > Ln->n_groups) { err = "flexiq_npu: count of 4-bit groups out of range"; break; }
          int32_t v = ((const int32_t*)(blob + Ln->sel_off))[k];
          const int32_t* LR = P->code + (int64_t)I[3] * NPU_IW;
          J = P->code + (int64_t)LR[3 + v] * NPU_IW;
          if (J[0] != OP_LDW || J[1] != tl) { err = "flexiq_npu: PREF target is not an LDW"; break; }
          ls[tl].wflip = (last_gemm_wbank ^ 1) ^ J[2];
          ls[tl].prefetched = 1;
        } else if (S->prefetched == 1 && I[11] == 1) {
          S->prefetched = 2;                 /* this first tile came in with the previous layer's PREF */
          break;
        }
        const npu_layer_t* Lw = &P->layers[tl];
        npu_lstate_t* Sw = &ls[tl];
        double* sw = (Lw->layer < n_stats) ? stats + (int64_t)(Lw->layer + 1) * NPU_STATS_COLS : NULL;
        int KKw = Lw->KH * Lw->KW;
        int b = J[2] ^ Sw->wflip;
        npu_wmeta_t m = {J[3], J[4], J[5], J[6], J[7]};
        int64_t bytes = (int64_t)m.olen * m.jlen * KKw;
        if (bytes > WB) { err = "flexiq_npu: WBUF overflow (codegen tiling bug)"; break; }
        const int8_t* w = (const int8_t*)(blob + Lw->w_off);
        for (int o = 0; o < m.olen; ++o) {
          const int8_t* src = m.gi >= 0 ? w + (((int64_t)m.gi * Lw->opg + m.o0 + o) * Lw->Cg + m.j0) * KKw
                                        : w + ((int64_t)m.o0 + o) * KKw;
          memcpy(wbuf[b] + (int64_t)o * m.jlen * KKw, src, (size_t)m.jlen * KKw);
        }
        wm[b] = m;
        if (I[0] == OP_PREF && sw) { sw[3] = 0; sw[14] = 0; sw[8] = 0; }   /* fresh row for the next layer */
        if (P->resident) {                   /* weights resident in the WBUF since program load: no DMA */
          tc.w_ready[b] = 0;
          if (sw && bytes > sw[8]) sw[8] = (double)bytes;
          break;
        }
        int64_t s = npu_max64(tc.dma_free, tc.w_free[b]);
        int64_t d = cfg->dma_setup + npu_ceil_div(bytes, cfg->dma_bw);
        tc.dma_free = s + d; tc.w_ready[b] = s + d;
        Sw->last_end = npu_max64(Sw->last_end, s + d);
        if (sw) { sw[3] += d; sw[14] += bytes; if (bytes > sw[8]) sw[8] = (double)bytes; }
        break;
      }
      case OP_DWGEMM:
      case OP_GEMM: {                        /* output tile block (+)= X . W over the K range in the banks */
        int xb = I[2], wb = I[3] ^ S->wflip, ob = I[4], acc = I[5];
        const npu_xmeta_t* X = &xm[xb];
        const npu_wmeta_t* Wm = &wm[wb];
        const int dw = I[0] == OP_DWGEMM;
        if (dw ? (X->gi != -1 || Wm->gi != -1 || X->j0 != Wm->o0 || X->jlen != Wm->olen)
               : (X->gi != Wm->gi || X->j0 != Wm->j0 || X->jlen != Wm->jlen)) {
          err = "flexiq_npu: GEMM operand mismatch"; break;
        }
        npu_ometa_t m = {X->gi, X->n0, X->nlen, X->oh0, X->ohlen, Wm->o0, Wm->olen};
        if (acc && memcmp(&om[ob], &m, sizeof m) != 0) { err = "flexiq_npu: GEMM accumulates into a different tile"; break; }
        int64_t mrows = (int64_t)m.nlen * m.ohlen * L->OW;
        if (mrows * m.olen * 4 > OB) { err = "flexiq_npu: OBUF overflow (codegen tiling bug)"; break; }
        const int32_t* rank = (const int32_t*)(blob + L->rank_off) + (dw ? 0 : (int64_t)m.gi * L->Cg) + X->j0;
        const int32_t* chan = (const int32_t*)(blob + L->chan_off) + X->j0;
        const int32_t* ex0 = (const int32_t*)(blob + L->ex_off);
        const int32_t* ew = (const int32_t*)(blob + L->ew_off);
        const int64_t rows_ps = L->N / L->samples;
        const int32_t k4 = S->k4;
        int64_t xplane = (int64_t)X->rows * L->Wp;
        int64_t macs8 = 0, macs4 = 0, kcyc_total = 0;
        int32_t* out = obuf[ob];
        if (dw) {
          /* depthwise mode: column j = channel at sorted position j0 + j, row i = output pixel; the
           * KH x KW taps stream in time (two taps per cycle in a 4-bit column) */
          for (int n = 0; n < m.nlen; ++n) {
            const int32_t* ex = L->dynamic ? S->exd + ((X->n0 + n) / rows_ps) * L->n_groups : ex0;
            for (int j = 0; j < X->jlen; ++j) {
              int low = rank[j] < k4;
              const int8_t* s = ibuf[xb] + ((int64_t)n * X->jlen + j) * xplane;
              int8_t* d = xcode + ((int64_t)n * X->jlen + j) * xplane;
              if (!low) { memcpy(d, s, (size_t)xplane); continue; }
              for (int64_t i = 0; i < xplane; ++i) {
                int32_t q = L->is_unsigned ? (int32_t)(uint8_t)s[i] : (int32_t)s[i];
                d[i] = (int8_t)npu_code4(q, ex[rank[j]], lo4, hi4);
              }
            }
          }
          for (int j = 0; j < X->jlen; ++j) {
            int low = rank[j] < k4;
            int32_t e = ew[(int64_t)chan[j] * L->n_groups + rank[j]];
            for (int i = 0; i < KK; ++i) {
              int8_t s = wbuf[wb][(int64_t)j * KK + i];
              wcode[(int64_t)j * KK + i] = low ? (int8_t)npu_code4(s, e, -8, 7) : s;
            }
          }
          for (int n = 0; n < m.nlen; ++n) {
            const int32_t* ex = L->dynamic ? S->exd + ((X->n0 + n) / rows_ps) * L->n_groups : ex0;
            for (int oh = 0; oh < m.ohlen; ++oh)
              for (int ow = 0; ow < L->OW; ++ow) {
                int64_t mi = ((int64_t)n * m.ohlen + oh) * L->OW + ow;
                int hb = oh * L->SH, wb0 = ow * L->SW;
                for (int j = 0; j < X->jlen; ++j) {
                  int low = rank[j] < k4;
                  const int8_t* xp = xcode + ((int64_t)n * X->jlen + j) * xplane;
                  const int8_t* wp = wcode + (int64_t)j * KK;
                  int64_t p = 0;
                  for (int kh = 0; kh < L->KH; ++kh) {
                    const int8_t* xr = xp + (int64_t)(hb + kh * L->DH) * L->Wp + wb0;
                    for (int kw = 0; kw < L->KW; ++kw) {
                      int32_t xv = (L->is_unsigned && !low) ? (int32_t)(uint8_t)xr[kw * L->DW] : (int32_t)xr[kw * L->DW];
                      p += (int64_t)xv * (int64_t)wp[kh * L->KW + kw];
                    }
                  }
                  int64_t a = acc ? (int64_t)out[mi * m.olen + j] : 0;
                  if (low) a += p * ((int64_t)1 << (ew[(int64_t)chan[j] * L->n_groups + rank[j]] + ex[rank[j]]));
                  else a += p;
                  out[mi * m.olen + j] = (int32_t)a;
                }
              }
          }
          /* cycles: per block of `cols` channels, ceil(mrows / rows) passes of KK cycles (8-bit) or
           * ceil(KK / 2) (all columns 4-bit); a pass is at least the accumulator drain */
          int64_t mp = npu_ceil_div(mrows, R);
          for (int c0 = 0; c0 < X->jlen; c0 += Ccols) {
            int c1 = c0 + Ccols < X->jlen ? c0 + Ccols : X->jlen, all_low = 1;
            for (int j = c0; j < c1; ++j) {
              if (rank[j] < k4) macs4 += (int64_t)KK * mrows; else { macs8 += (int64_t)KK * mrows; all_low = 0; }
            }
            int64_t kc = all_low ? (KK + 1) / 2 : KK;
            kcyc_total += mp * npu_max64(kc, cfg->drain);
          }
        } else {
          /* runs of equal rank (channels are sorted by rank); precision per run from K4 */
          int32_t run_s[1024], run_r[1024], nrun = 0;
          for (int j = 0; j < X->jlen; ++j) {
            if (nrun == 0 || rank[j] != run_r[nrun - 1]) {
              if (nrun == 1024) { err = "flexiq_npu: too many channel runs in one tile"; break; }
              run_s[nrun] = j; run_r[nrun] = rank[j]; ++nrun;
            }
          }
          if (err) break;
          /* bit-extraction units: 4-bit codes of the low runs (activations per group, weights per (o, group)) */
          for (int n = 0; n < X->nlen; ++n) {
            const int32_t* ex = L->dynamic ? S->exd + ((X->n0 + n) / rows_ps) * L->n_groups : ex0;
            for (int r = 0; r < nrun; ++r) {
              int j1 = (r + 1 < nrun) ? run_s[r + 1] : X->jlen;
              int low = run_r[r] < k4;
              for (int j = run_s[r]; j < j1; ++j) {
                const int8_t* s = ibuf[xb] + ((int64_t)n * X->jlen + j) * xplane;
                int8_t* d = xcode + ((int64_t)n * X->jlen + j) * xplane;
                if (!low) { memcpy(d, s, (size_t)xplane); continue; }
                int32_t e = ex[run_r[r]];
                for (int64_t i = 0; i < xplane; ++i) {
                  int32_t q = L->is_unsigned ? (int32_t)(uint8_t)s[i] : (int32_t)s[i];
                  d[i] = (int8_t)npu_code4(q, e, lo4, hi4);
                }
              }
            }
          }
          for (int o = 0; o < m.olen; ++o) {
            int64_t og = (int64_t)m.gi * L->opg + m.o0 + o;
            for (int r = 0; r < nrun; ++r) {
              int j1 = (r + 1 < nrun) ? run_s[r + 1] : X->jlen;
              int low = run_r[r] < k4;
              int32_t e = ew[og * L->n_groups + run_r[r]];
              const int8_t* s = wbuf[wb] + ((int64_t)o * X->jlen + run_s[r]) * KK;
              int8_t* d = wcode + ((int64_t)o * X->jlen + run_s[r]) * KK;
              for (int64_t i = 0; i < (int64_t)(j1 - run_s[r]) * KK; ++i)
                d[i] = low ? (int8_t)npu_code4(s[i], e, -8, 7) : s[i];
            }
          }
          /* the array: every PE (m, o) accumulates; a low run's partial sum is shifted at its end */
          for (int n = 0; n < m.nlen; ++n) {
            const int32_t* ex = L->dynamic ? S->exd + ((X->n0 + n) / rows_ps) * L->n_groups : ex0;
            for (int oh = 0; oh < m.ohlen; ++oh)
              for (int ow = 0; ow < L->OW; ++ow) {
                int64_t mi = ((int64_t)n * m.ohlen + oh) * L->OW + ow;
                int hb = oh * L->SH, wb0 = ow * L->SW;
                for (int o = 0; o < m.olen; ++o) {
                  int64_t og = (int64_t)m.gi * L->opg + m.o0 + o;
                  int64_t a = acc ? (int64_t)out[mi * m.olen + o] : 0;
                  for (int r = 0; r < nrun; ++r) {
                    int j1 = (r + 1 < nrun) ? run_s[r + 1] : X->jlen;
                    int low = run_r[r] < k4;
                    int64_t p = 0;
                    for (int j = run_s[r]; j < j1; ++j) {
                      const int8_t* xp = xcode + ((int64_t)n * X->jlen + j) * xplane;
                      const int8_t* wp = wcode + ((int64_t)o * X->jlen + j) * KK;
                      for (int kh = 0; kh < L->KH; ++kh) {
                        const int8_t* xr = xp + (int64_t)(hb + kh * L->DH) * L->Wp + wb0;
                        for (int kw = 0; kw < L->KW; ++kw) {
                          int32_t xv = (L->is_unsigned && !low) ? (int32_t)(uint8_t)xr[kw * L->DW] : (int32_t)xr[kw * L->DW];
                          p += (int64_t)xv * (int64_t)wp[kh * L->KW + kw];
                        }
                      }
                    }
                    if (low) a += p * ((int64_t)1 << (ew[og * L->n_groups + run_r[r]] + ex[run_r[r]]));
                    else a += p;
                  }
                  out[mi * m.olen + o] = (int32_t)a;
                }
              }
          }
          /* cycles: passes of R x C outputs; per pass each run streams len*KK (8-bit) or
           * ceil(len*KK/2) (dual 4-bit) cycles; a pass is at least the accumulator drain */
          int64_t kcyc = 0;
          for (int r = 0; r < nrun; ++r) {
            int j1 = (r + 1 < nrun) ? run_s[r + 1] : X->jlen;
            int64_t len = (int64_t)(j1 - run_s[r]) * KK;
            int low = run_r[r] < k4;
            kcyc += low ? (len + 1) / 2 : len;
            if (low) macs4 += len * mrows * m.olen; else macs8 += len * mrows * m.olen;
          }
          int64_t passes = npu_ceil_div(mrows, R) * npu_ceil_div(m.olen, Ccols);
          kcyc_total = passes * npu_max64(kcyc, cfg->drain);
        }
        int64_t s = npu_max64(tc.arr_free, npu_max64(tc.x_ready[xb], tc.w_ready[wb]));
        s = npu_max64(s, acc ? tc.o_ready[ob] : tc.o_free[ob]);
        /* the skew fill is paid when the array starts from idle; back-to-back instructions stream
         * their operands in while the previous accumulators move to the shadow registers */
        int64_t dur = (s > tc.arr_free ? cfg->fill : 0) + kcyc_total;
        int64_t e = s + dur;
        tc.arr_free = e;
        tc.x_free[xb] = npu_max64(tc.x_free[xb], e);
        tc.w_free[wb] = npu_max64(tc.w_free[wb], e);
        tc.o_ready[ob] = e; tc.o_free[ob] = npu_max64(tc.o_free[ob], e);
        last_gemm_wbank = wb;
        om[ob] = m;
        S->last_end = npu_max64(S->last_end, e);
        if (st) { st[2] += dur; st[5] += macs8; st[6] += macs4; st[10] += 1;
                  double ob_bytes = (double)(mrows * m.olen * 4); if (ob_bytes > st[9]) st[9] = ob_bytes; }
        break;
      }
      case OP_VEC: {                         /* dequantize + bias (+ ReLU / ReLU6), in place, float32 */
        int b = I[2];
        const npu_ometa_t* m = &om[b];
        const float* sc = (const float*)(blob + L->scale_off);
        const float* bi = (const float*)(blob + L->bias_off) + (int64_t)S->brow * L->O;
        const int32_t* chan = (const int32_t*)(blob + L->chan_off);
        int64_t mrows = (int64_t)m->nlen * m->ohlen * L->OW;
        float* f = (float*)obuf[b];
        for (int64_t mi = 0; mi < mrows; ++mi)
          for (int o = 0; o < m->olen; ++o) {
            int64_t og = m->gi >= 0 ? (int64_t)m->gi * L->opg + m->o0 + o : chan[m->o0 + o];
            float p = (float)obuf[b][mi * m->olen + o] * sc[og];
            float y = p + bi[og];
            if (L->act) { if (y < L->act_lo) y = L->act_lo; if (y > L->act_hi) y = L->act_hi; }
            f[mi * m->olen + o] = y;
          }
        const int n_dyn = npu_dynamic_consumers(P, L->n_req, L->req_layer);   /* max tracking while requantizing */
        /* the output stage is a pipeline (dequantize, bias, activation, requantize, write): one pass
         * writes the float result and the first copy; each further copy takes another pass, and a
         * dynamic consumer's max tracking one more */
        int64_t passes = L->n_req + L->n_fadd > 1 ? L->n_req + L->n_fadd : 1;
        int64_t v = npu_ceil_div(mrows * m->olen, cfg->lanes) * (passes + n_dyn);
        int64_t s = npu_max64(tc.vec_free, tc.o_ready[b]), e = s + v;
        tc.vec_free = e; tc.o_ready[b] = e; tc.o_free[b] = npu_max64(tc.o_free[b], e);
        S->last_end = npu_max64(S->last_end, e);
        if (st) st[4] += v;
        break;
      }
      case OP_ST: {                          /* float result -> DRAM; INT8 copies -> ABUF or DRAM */
        int b = I[2];
        const npu_ometa_t* m = &om[b];
        const float* f = (const float*)obuf[b];
        const int32_t* chan = (const int32_t*)(blob + L->chan_off);
        float* y = NULL;
        if (L->out_index >= 0) {
          DLTensor* Y = T[P->n_params + L->out_index];
          y = (float*)((char*)Y->data + Y->byte_offset);
        }
        int64_t elems = 0;
        for (int n = 0; n < m->nlen; ++n)
          for (int oh = 0; oh < m->ohlen; ++oh)
            for (int ow = 0; ow < L->OW; ++ow) {
              int64_t mi = ((int64_t)n * m->ohlen + oh) * L->OW + ow;
              for (int o = 0; o < m->olen; ++o) {
                int64_t og = m->gi >= 0 ? (int64_t)m->gi * L->opg + m->o0 + o : chan[m->o0 + o];
                float v = f[mi * m->olen + o];
                int64_t idx = (((int64_t)(m->n0 + n) * L->O + og) * L->OH + (m->oh0 + oh)) * L->OW + ow;
                if (y) y[idx] = v;
                npu_fan_out(P, qin, fin, L->n_req, L->req_layer, L->n_fadd, L->fadd, idx, v);
                ++elems;
              }
            }
        int64_t bytes = elems * ((y ? 4 : 0) + npu_offchip_bytes_per_elem(P, L->n_req, L->req_layer, L->n_fadd, L->fadd));
        int64_t s = npu_max64(tc.dma_free, tc.o_ready[b]);
        int64_t d = bytes ? cfg->dma_setup + npu_ceil_div(bytes, cfg->dma_bw) : 0;
        if (bytes) tc.dma_free = s + d;
        tc.o_free[b] = npu_max64(tc.o_free[b], s + d);
        S->last_end = npu_max64(S->last_end, s + d);
        if (st) { st[3] += d; st[14] += bytes; }
        break;
      }
      case OP_SYNC: {                        /* the layer ends when its own work is done; jump past variants */
        int64_t end = npu_max64(npu_max64(prev_end, S->last_end), add_end);   /* adds before it count here */
        if (st) { st[1] = (double)(end - prev_end); st[13] = I[3]; }
        last_st = st;
        if (st) { st[3] += add_dma; st[4] += add_vec; st[14] += add_bytes; }
        add_dma = add_vec = add_bytes = 0;
        npu_consumers_ready(ls, add_ready, L->n_req, L->req_layer, L->n_fadd, L->fadd, end);
        prev_end = end;
        S->prefetched = 0; S->wflip = 0;
        pc = I[2] - 1;
        break;
      }
      default: err = "flexiq_npu: illegal instruction";
    }
  }
  if (!err && last_st) {                     /* trailing adds count with the last layer */
    if (add_end > prev_end) last_st[1] += (double)(add_end - prev_end);
    last_st[3] += add_dma; last_st[4] += add_vec; last_st[14] += add_bytes;
  }
  for (int b = 0; b < 2; ++b) { free(ibuf[b]); free(wbuf[b]); free(obuf[b]); }
  free(xcode); free(wcode);
  if (fin) { for (int a = 0; a < 2 * P->n_adds; ++a) free(fin[a]); free(fin); }
  free(add_ready);
  if (qin) { for (int l = 0; l < P->n_layers; ++l) free(qin[l]); free(qin); }
  if (ls) { for (int l = 0; l < P->n_layers; ++l) free(ls[l].exd); free(ls); }
  if (err) return npu_fail(err);
  return 0;
}

static void npu_ret_none(TVMFFIAny* result) {
  result->type_index = kTVMFFINone; result->zero_padding = 0; result->v_int64 = 0;
}

/* ---------------------------------------------------------------- generated part follows */
