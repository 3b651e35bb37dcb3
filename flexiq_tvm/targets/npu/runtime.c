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
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifdef __cplusplus
extern "C" {
#endif

enum { OP_LDREG = 1, OP_QUANT = 2, OP_LDX = 3, OP_LDW = 4, OP_GEMM = 5, OP_VEC = 6, OP_ST = 7, OP_SYNC = 8 };
#define NPU_IW 12          /* int32 words per instruction */
#define NPU_MAX_REQ 8

typedef struct {
  int32_t layer;                              /* flexiq.layer: index into counts and the stats table */
  int32_t N, C, H, W, O, OH, OW, KH, KW, SH, SW, DH, DW, PT, PL, Hp, Wp, groups, Cg, opg;
  int32_t is_unsigned, relu, n_groups;
  float act_scale;
  int64_t w_off;      /* int8  [groups][opg][Cg][KH][KW], input channels in lowering order */
  int64_t chan_off;   /* int32 [groups][Cg]: channel (within the conv group) at sorted position j */
  int64_t rank_off;   /* int32 [groups][Cg]: lowering group (rank) of sorted position j */
  int64_t ex_off;     /* int32 [n_groups]: activation shift per group */
  int64_t ew_off;     /* int32 [O][n_groups]: weight shift per (output channel, group) */
  int64_t scale_off;  /* f32 [O] */
  int64_t bias_off;   /* f32 [O] */
  int32_t in_param;   /* >= 0: the float input is function argument in_param (quantized by QUANT) */
  int32_t out_index;  /* >= 0: the float result goes to DPS output out_index */
  int32_t n_req;      /* internal consumers: requantized INT8 copies in the consumers' input buffers */
  int32_t req_layer[NPU_MAX_REQ];
} npu_layer_t;

typedef struct {
  const npu_layer_t* layers;   /* program-local layer table */
  int32_t n_layers;
  const int32_t* code;         /* NPU_IW words per instruction */
  int32_t n_instr;
  int32_t n_params, n_outputs, counts_param;
} npu_program_t;

/* ---- configuration (filled by the codegen) ---- */
typedef struct {
  int32_t rows, cols, ibuf, wbuf, obuf, dma_bw, dma_setup, lanes, fill;
  double clock_mhz;
} npu_config_t;

#define NPU_STATS_COLS 12
/* stats row (one per flexiq layer): valid, total, compute, dma, vector, macs8, macs4,
 * ibuf_max, wbuf_max, obuf_max, gemm_instr, k4 */

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

typedef struct { int32_t gi, n0, nlen, oh0, ohlen, j0, jlen, rows, hp0; } npu_xmeta_t;
typedef struct { int32_t gi, o0, olen, j0, jlen; } npu_wmeta_t;
typedef struct { int32_t gi, n0, nlen, oh0, ohlen, o0, olen; } npu_ometa_t;

typedef struct {
  int64_t dma_free, arr_free, vec_free;
  int64_t x_ready[2], x_free[2], w_ready[2], w_free[2], o_ready[2], o_free[2];
} npu_clock_t;

static void npu_sync(npu_clock_t* t, int64_t* now) {
  int64_t m = npu_max64(t->dma_free, npu_max64(t->arr_free, t->vec_free));
  for (int b = 0; b < 2; ++b) {
    m = npu_max64(m, npu_max64(t->x_free[b], t->x_ready[b]));
    m = npu_max64(m, npu_max64(t->w_free[b], t->w_ready[b]));
    m = npu_max64(m, npu_max64(t->o_free[b], t->o_ready[b]));
  }
  *now = m;
  t->dma_free = t->arr_free = t->vec_free = m;
  for (int b = 0; b < 2; ++b) {
    t->x_ready[b] = t->x_free[b] = t->w_ready[b] = t->w_free[b] = t->o_ready[b] = t->o_free[b] = m;
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
  const int32_t* counts = (const int32_t*)((const char*)T[P->counts_param]->data + T[P->counts_param]->byte_offset);
  int64_t n_counts = T[P->counts_param]->shape[0];

  const int64_t IB = cfg->ibuf / 2, WB = cfg->wbuf / 2, OB = cfg->obuf / 2;
  int8_t* ibuf[2] = {(int8_t*)malloc(IB), (int8_t*)malloc(IB)};
  int8_t* wbuf[2] = {(int8_t*)malloc(WB), (int8_t*)malloc(WB)};
  int32_t* obuf[2] = {(int32_t*)malloc(OB), (int32_t*)malloc(OB)};
  int8_t* xcode = (int8_t*)malloc(IB);     /* feeder's bit-extracted copy of the IBUF tile */
  int8_t* wcode = (int8_t*)malloc(WB);     /* weight loader's bit-extracted copy of the WBUF tile */
  int8_t** qin = (int8_t**)calloc(P->n_layers, sizeof(int8_t*));   /* simulated DRAM: layer inputs */
  int ok = ibuf[0] && ibuf[1] && wbuf[0] && wbuf[1] && obuf[0] && obuf[1] && xcode && wcode && qin;
  for (int l = 0; ok && l < P->n_layers; ++l) {
    const npu_layer_t* L = &P->layers[l];
    qin[l] = (int8_t*)malloc((size_t)L->N * L->C * L->H * L->W);
    if (!qin[l]) ok = 0;
  }
  const char* err = ok ? NULL : "flexiq_npu: out of host memory";
  npu_xmeta_t xm[2];
  npu_wmeta_t wm[2];
  npu_ometa_t om[2];
  memset(xm, 0, sizeof xm); memset(wm, 0, sizeof wm); memset(om, 0, sizeof om);
  npu_clock_t tc;
  memset(&tc, 0, sizeof tc);
  int64_t now = 0, layer_start = 0;
  int32_t k4 = 0;
  double* st = NULL;
  const int32_t R = cfg->rows, Ccols = cfg->cols;

  for (int32_t pc = 0; !err && pc < P->n_instr; ++pc) {
    const int32_t* I = P->code + (int64_t)pc * NPU_IW;
    const npu_layer_t* L = &P->layers[I[1]];
    const int32_t lo = L->is_unsigned ? 0 : -127, hi = L->is_unsigned ? 255 : 127;
    const int32_t lo4 = L->is_unsigned ? 0 : -8, hi4 = L->is_unsigned ? 15 : 7;
    const int32_t KK = L->KH * L->KW;
    switch (I[0]) {
      case OP_LDREG: {                       /* K4 <- counts[layer] */
        if (L->layer >= n_counts) { err = "flexiq_npu: counts tensor too short"; break; }
        k4 = counts[L->layer];
        if (k4 < 0 || k4 > L->n_groups) { err = "flexiq_npu: count of 4-bit groups out of range"; break; }
        layer_start = now;
        st = (L->layer < n_stats) ? stats + (int64_t)(L->layer + 1) * NPU_STATS_COLS : NULL;
        if (st) { memset(st, 0, sizeof(double) * NPU_STATS_COLS); st[0] = 1; st[11] = k4; }
        break;
      }
      case OP_QUANT: {                       /* float input -> INT8 codes (vector unit, streamed) */
        const DLTensor* X = T[I[2]];
        const float* xf = (const float*)((const char*)X->data + X->byte_offset);
        int64_t n = (int64_t)L->N * L->C * L->H * L->W;
        int8_t* q = qin[I[1]];
        for (int64_t i = 0; i < n; ++i) q[i] = (int8_t)npu_quant(xf[i], L->act_scale, lo, hi);
        int64_t d = cfg->dma_setup + npu_ceil_div(n * 5, cfg->dma_bw), v = npu_ceil_div(n, cfg->lanes);
        int64_t s = npu_max64(tc.dma_free, tc.vec_free), e = s + npu_max64(d, v);
        tc.dma_free = tc.vec_free = e;
        if (st) { st[3] += d; st[4] += v; }
        break;
      }
      case OP_LDX: {                         /* activation patch -> IBUF bank (zero padding by the DMA) */
        int b = I[2];
        npu_xmeta_t m = {I[3], I[4], I[5], I[6], I[7], I[8], I[9], 0, 0};
        m.rows = (m.ohlen - 1) * L->SH + (L->KH - 1) * L->DH + 1;
        m.hp0 = m.oh0 * L->SH;
        int64_t bytes = (int64_t)m.nlen * m.jlen * m.rows * L->Wp;
        if (bytes > IB) { err = "flexiq_npu: IBUF overflow (codegen tiling bug)"; break; }
        const int32_t* chan = (const int32_t*)(blob + L->chan_off) + (int64_t)m.gi * L->Cg;
        int8_t* dst = ibuf[b];
        const int8_t* src = qin[I[1]];
        for (int n = 0; n < m.nlen; ++n)
          for (int j = 0; j < m.jlen; ++j) {
            int64_t c = (int64_t)m.gi * L->Cg + chan[m.j0 + j];
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
        int64_t s = npu_max64(tc.dma_free, tc.x_free[b]);
        int64_t d = cfg->dma_setup + npu_ceil_div(bytes, cfg->dma_bw);
        tc.dma_free = s + d; tc.x_ready[b] = s + d;
        if (st) { st[3] += d; if (bytes > st[7]) st[7] = (double)bytes; }
        break;
      }
      case OP_LDW: {                         /* INT8 weights (lowering order) -> WBUF bank */
        int b = I[2];
        npu_wmeta_t m = {I[3], I[4], I[5], I[6], I[7]};
        int64_t bytes = (int64_t)m.olen * m.jlen * KK;
        if (bytes > WB) { err = "flexiq_npu: WBUF overflow (codegen tiling bug)"; break; }
        const int8_t* w = (const int8_t*)(blob + L->w_off);
        for (int o = 0; o < m.olen; ++o) {
          const int8_t* src = w + (((int64_t)m.gi * L->opg + m.o0 + o) * L->Cg + m.j0) * KK;
          memcpy(wbuf[b] + (int64_t)o * m.jlen * KK, src, (size_t)m.jlen * KK);
        }
        wm[b] = m;
        int64_t s = npu_max64(tc.dma_free, tc.w_free[b]);
        int64_t d = cfg->dma_setup + npu_ceil_div(bytes, cfg->dma_bw);
        tc.dma_free = s + d; tc.w_ready[b] = s + d;
        if (st) { st[3] += d; if (bytes > st[8]) st[8] = (double)bytes; }
        break;
      }
      case OP_GEMM: {                        /* output tile block += X . W over the K range in the banks */
        int xb = I[2], wb = I[3], ob = I[4], acc = I[5];
        const npu_xmeta_t* X = &xm[xb];
        const npu_wmeta_t* Wm = &wm[wb];
        if (X->gi != Wm->gi || X->j0 != Wm->j0 || X->jlen != Wm->jlen) { err = "flexiq_npu: GEMM operand mismatch"; break; }
        npu_ometa_t m = {X->gi, X->n0, X->nlen, X->oh0, X->ohlen, Wm->o0, Wm->olen};
        if (acc && memcmp(&om[ob], &m, sizeof m) != 0) { err = "flexiq_npu: GEMM accumulates into a different tile"; break; }
        int64_t mrows = (int64_t)m.nlen * m.ohlen * L->OW;
        if (mrows * m.olen * 4 > OB) { err = "flexiq_npu: OBUF overflow (codegen tiling bug)"; break; }
        const int32_t* rank = (const int32_t*)(blob + L->rank_off) + (int64_t)m.gi * L->Cg + X->j0;
        const int32_t* ex = (const int32_t*)(blob + L->ex_off);
        const int32_t* ew = (const int32_t*)(blob + L->ew_off);
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
        int64_t xplane = (int64_t)X->rows * L->Wp;
        for (int n = 0; n < X->nlen; ++n)
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
        int32_t* out = obuf[ob];
        int64_t macs8 = 0, macs4 = 0;
        for (int n = 0; n < m.nlen; ++n)
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
        /* cycles: passes of R x C outputs; per pass each run streams len*KK (8-bit) or
         * ceil(len*KK/2) (dual 4-bit) cycles; draining R accumulator rows bounds a pass from below */
        int64_t kcyc = 0;
        for (int r = 0; r < nrun; ++r) {
          int j1 = (r + 1 < nrun) ? run_s[r + 1] : X->jlen;
          int64_t len = (int64_t)(j1 - run_s[r]) * KK;
          int low = run_r[r] < k4;
          kcyc += low ? (len + 1) / 2 : len;
          if (low) macs4 += len * mrows * m.olen; else macs8 += len * mrows * m.olen;
        }
        int64_t passes = npu_ceil_div(mrows, R) * npu_ceil_div(m.olen, Ccols);
        int64_t dur = cfg->fill + passes * npu_max64(kcyc, R);
        int64_t s = npu_max64(tc.arr_free, npu_max64(tc.x_ready[xb], tc.w_ready[wb]));
        s = npu_max64(s, acc ? tc.o_ready[ob] : tc.o_free[ob]);
        int64_t e = s + dur;
        tc.arr_free = e;
        tc.x_free[xb] = npu_max64(tc.x_free[xb], e);
        tc.w_free[wb] = npu_max64(tc.w_free[wb], e);
        tc.o_ready[ob] = e; tc.o_free[ob] = npu_max64(tc.o_free[ob], e);
        om[ob] = m;
        if (st) { st[2] += dur; st[5] += macs8; st[6] += macs4; st[10] += 1;
                  double ob_bytes = (double)(mrows * m.olen * 4); if (ob_bytes > st[9]) st[9] = ob_bytes; }
        break;
      }
      case OP_VEC: {                         /* dequantize + bias (+ ReLU), in place, float32 */
        int b = I[2];
        const npu_ometa_t* m = &om[b];
        const float* sc = (const float*)(blob + L->scale_off);
        const float* bi = (const float*)(blob + L->bias_off);
        int64_t mrows = (int64_t)m->nlen * m->ohlen * L->OW;
        float* f = (float*)obuf[b];
        for (int64_t mi = 0; mi < mrows; ++mi)
          for (int o = 0; o < m->olen; ++o) {
            int64_t og = (int64_t)m->gi * L->opg + m->o0 + o;
            float p = (float)obuf[b][mi * m->olen + o] * sc[og];
            float y = p + bi[og];
            if (L->relu && y < 0.0f) y = 0.0f;
            f[mi * m->olen + o] = y;
          }
        int64_t v = npu_ceil_div(mrows * m->olen, cfg->lanes) * (1 + L->n_req);
        int64_t s = npu_max64(tc.vec_free, tc.o_ready[b]), e = s + v;
        tc.vec_free = e; tc.o_ready[b] = e; tc.o_free[b] = npu_max64(tc.o_free[b], e);
        if (st) st[4] += v;
        break;
      }
      case OP_ST: {                          /* float result and/or requantized INT8 copies -> DRAM */
        int b = I[2];
        const npu_ometa_t* m = &om[b];
        const float* f = (const float*)obuf[b];
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
                int64_t og = (int64_t)m->gi * L->opg + m->o0 + o;
                float v = f[mi * m->olen + o];
                int64_t idx = (((int64_t)(m->n0 + n) * L->O + og) * L->OH + (m->oh0 + oh)) * L->OW + ow;
                if (y) y[idx] = v;
                for (int c = 0; c < L->n_req; ++c) {
                  const npu_layer_t* Lc = &P->layers[L->req_layer[c]];
                  int32_t clo = Lc->is_unsigned ? 0 : -127, chi = Lc->is_unsigned ? 255 : 127;
                  qin[L->req_layer[c]][idx] = (int8_t)npu_quant(v, Lc->act_scale, clo, chi);
                }
                ++elems;
              }
            }
        int64_t bytes = elems * ((y ? 4 : 0) + L->n_req);
        int64_t s = npu_max64(tc.dma_free, tc.o_ready[b]);
        int64_t d = cfg->dma_setup + npu_ceil_div(bytes, cfg->dma_bw);
        tc.dma_free = s + d; tc.o_free[b] = s + d;
        if (st) st[3] += d;
        break;
      }
      case OP_SYNC: {
        npu_sync(&tc, &now);
        if (st) st[1] = (double)(now - layer_start);
        break;
      }
      default: err = "flexiq_npu: illegal instruction";
    }
  }
  for (int b = 0; b < 2; ++b) { free(ibuf[b]); free(wbuf[b]); free(obuf[b]); }
  free(xcode); free(wcode);
  if (qin) { for (int l = 0; l < P->n_layers; ++l) free(qin[l]); free(qin); }
  if (err) return npu_fail(err);
  return 0;
}

static void npu_ret_none(TVMFFIAny* result) {
  result->type_index = kTVMFFINone; result->zero_padding = 0; result->v_int64 = 0;
}

/* ---------------------------------------------------------------- generated part follows */
