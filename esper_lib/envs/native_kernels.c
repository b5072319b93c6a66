/* Direct kernels for the morphogenetic env's tiny convolutions and 2x2 max-pool (float32, NCHW).
 *
 * Built on first use by esper_lib/envs/native.py with the system C compiler and loaded with ctypes.
 * Compiled without -ffast-math: every output is a fixed sequence of IEEE operations (vectorised
 * across independent outputs only, with GCC vector types), so the results do not depend on the vector
 * width; multiply-adds are fused where the CPU has FMA (every x86-64 CPU since 2013). A scalar sum of
 * products is written with fmaf: the compiler fuses a * b + c only where it does not vectorise the loop, and
 * that choice may depend on the vector width.
 *
 * Convolution: stride 1, dilation 1, zero padding `pad` on every side, `groups` groups, square
 * kernel K, computed directly from a zero-padded copy of each image (no im2col): each output is
 * bias + sum over (c, ky, kx), in that order, of w * input. Gradients: weights and bias accumulate
 * in VW partial sums per entry (lane = output column mod VW), summed in lane order at the end; the
 * input gradient adds each output's weighted gradient at the inputs it read, in (c, i, j, ky, kx) order.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    int64_t N, C, H, W, O, K, pad, groups, Ho, Wo, HWo, Hp, Wp, KK, cg, og, R;
} geom_t;

static geom_t geometry(int64_t N, int64_t C, int64_t H, int64_t W, int64_t O, int64_t K, int64_t pad, int64_t groups) {
    geom_t g;
    g.N = N; g.C = C; g.H = H; g.W = W; g.O = O; g.K = K; g.pad = pad; g.groups = groups;
    g.Ho = H + 2 * pad - K + 1;
    g.Wo = W + 2 * pad - K + 1;
    g.HWo = g.Ho * g.Wo;
    g.Hp = H + 2 * pad;
    g.Wp = W + 2 * pad;
    g.KK = K * K;
    g.cg = C / groups;
    g.og = O / groups;
    g.R = g.cg * g.KK;
    return g;
}

/* Copy one image into the interior of a zero-padded buffer xp [C, Hp, Wp] (its border stays zero). */
static void copy_row(float *restrict dst, const float *restrict src, int64_t W) {
    /* the env's rows are 4 or 8 floats: a copy of constant size is inlined, a library call is not */
    if (W == 8) memcpy(dst, src, 8 * sizeof(float));
    else if (W == 4) memcpy(dst, src, 4 * sizeof(float));
    else memcpy(dst, src, (size_t)W * sizeof(float));
}

static void pad_image(const float *restrict x, float *restrict xp, const geom_t *g) {
    for (int64_t c = 0; c < g->C; c++)
        for (int64_t i = 0; i < g->H; i++) copy_row(xp + (c * g->Hp + i + g->pad) * g->Wp + g->pad, x + (c * g->H + i) * g->W, g->W);
}

/* The kernels work on chunks of VW consecutive outputs of one output row (VW divides Wo), held in GCC
 * vector types: one set of functions per VW in {8, 4, 1} (the macro below), dispatched on Wo. */
#define DEFINE_KERNELS(VW)                                                                                          \
    typedef float v##VW __attribute__((vector_size(VW * sizeof(float))));                                          \
    static inline v##VW load##VW(const float *p) { v##VW v; memcpy(&v, p, sizeof v); return v; }                    \
    static inline void store##VW(float *p, v##VW v) { memcpy(p, &v, sizeof v); }                                    \
    typedef int32_t vi##VW __attribute__((vector_size(VW * sizeof(int32_t))));                                     \
    /* max(v, 0) lane by lane, NaN kept (NaN < 0 is false), as the scalar v < 0 ? 0 : v */                         \
    static inline v##VW relu##VW(v##VW v) { return (v##VW)((vi##VW)v & ~(vi##VW)(v < (v##VW){0})); }              \
                                                                                                                    \
    /* MBK outputs o0.. of one chunk at output (i, j0): bias + sum over (c, ky, kx) of w * input. */                \
    DEFINE_FWD_BLOCK(VW, 8)                                                                                         \
    DEFINE_FWD_BLOCK(VW, 4)                                                                                         \
    DEFINE_FWD_BLOCK(VW, 1)                                                                                         \
    static void forward##VW(const float *restrict xp, const float *restrict w, const float *restrict b,            \
                            float *restrict yn, const geom_t *g, int relu) {                                        \
        for (int64_t gi = 0; gi < g->groups; gi++) {                                                                \
            int64_t o0 = gi * g->og, o1 = o0 + g->og;                                                               \
            const float *xg = xp + gi * g->cg * g->Hp * g->Wp;                                                      \
            for (int64_t i = 0; i < g->Ho; i++)                                                                     \
                for (int64_t j0 = 0; j0 < g->Wo; j0 += VW) {                                                        \
                    int64_t o = o0;                                                                                 \
                    for (; o + 8 <= o1; o += 8) fwd_block##VW##_8(xg, w, b, yn, g, o, i, j0, relu);                 \
                    for (; o + 4 <= o1; o += 4) fwd_block##VW##_4(xg, w, b, yn, g, o, i, j0, relu);                 \
                    for (; o < o1; o++) fwd_block##VW##_1(xg, w, b, yn, g, o, i, j0, relu);                         \
                }                                                                                                   \
        }                                                                                                           \
    }                                                                                                               \
                                                                                                                    \
    DEFINE_GRADS(VW, 1)                                                                                             \
    DEFINE_GRADS(VW, 3)

/* Gradients for kernel size KS (1 or 3): the KS*KS taps accumulate in independent registers. */
#define DEFINE_GRADS(VW, KS)                                                                                        \
    /* Weight and bias gradients of one image, added to VW-lane partial sums wpart [O*R][VW], bpart [O][VW]. */     \
    static void grad_weight##VW##_##KS(const float *restrict xp, const float *restrict G, float *restrict wpart,    \
                                       float *restrict bpart, const geom_t *g) {                                    \
        for (int64_t o = 0; o < g->O; o++) {                                                                        \
            const float *Go = G + o * g->HWo;                                                                       \
            if (bpart) {                                                                                            \
                v##VW acc = load##VW(bpart + o * VW);                                                               \
                for (int64_t q = 0; q < g->HWo; q += VW) acc += load##VW(Go + q);                                   \
                store##VW(bpart + o * VW, acc);                                                                     \
            }                                                                                                       \
            if (!wpart) continue;                                                                                   \
            const float *xg = xp + (o / g->og) * g->cg * g->Hp * g->Wp;                                             \
            for (int64_t c = 0; c < g->cg; c++) {                                                                   \
                float *part = wpart + (o * g->R + c * KS * KS) * VW;                                                \
                v##VW acc[KS * KS];                                                                                 \
                for (int k = 0; k < KS * KS; k++) acc[k] = load##VW(part + k * VW);                                 \
                for (int64_t i = 0; i < g->Ho; i++)                                                                 \
                    for (int64_t j0 = 0; j0 < g->Wo; j0 += VW) {                                                    \
                        v##VW gv = load##VW(Go + i * g->Wo + j0);                                                   \
                        for (int ky = 0; ky < KS; ky++) {                                                           \
                            const float *xr = xg + (c * g->Hp + i + ky) * g->Wp + j0;                               \
                            for (int kx = 0; kx < KS; kx++) acc[ky * KS + kx] += gv * load##VW(xr + kx);            \
                        }                                                                                           \
                    }                                                                                               \
                for (int k = 0; k < KS * KS; k++) store##VW(part + k * VW, acc[k]);                                 \
            }                                                                                                       \
        }                                                                                                           \
    }                                                                                                               \
                                                                                                                    \
    /* Input gradient of one image into the padded buffer gxp (zeroed here): each output chunk's gradient,     \
     * weighted, added at the input positions it read. */                                                          \
    static void grad_input##VW##_##KS(const float *restrict w, const float *restrict G, float *restrict gxp,         \
                                      const geom_t *g) {                                                            \
        memset(gxp, 0, (size_t)(g->C * g->Hp * g->Wp) * sizeof(float));                                            \
        for (int64_t c = 0; c < g->C; c++) {                                                                        \
            int64_t gi = c / g->cg, cl = c - gi * g->cg;                                                            \
            for (int64_t i = 0; i < g->Ho; i++)                                                                     \
                for (int64_t j0 = 0; j0 < g->Wo; j0 += VW) {                                                        \
                    v##VW acc[KS * KS];                                                                             \
                    for (int k = 0; k < KS * KS; k++) acc[k] = (v##VW){0};                                          \
                    for (int64_t o = gi * g->og; o < (gi + 1) * g->og; o++) {                                       \
                        v##VW gv = load##VW(G + o * g->HWo + i * g->Wo + j0);                                       \
                        const float *wo = w + o * g->R + cl * KS * KS;                                              \
                        for (int k = 0; k < KS * KS; k++) acc[k] += wo[k] * gv;                                     \
                    }                                                                                               \
                    for (int ky = 0; ky < KS; ky++) {                                                               \
                        float *dst = gxp + (c * g->Hp + i + ky) * g->Wp + j0;                                       \
                        for (int kx = 0; kx < KS; kx++) store##VW(dst + kx, load##VW(dst + kx) + acc[ky * KS + kx]); \
                    }                                                                                               \
                }                                                                                                   \
        }                                                                                                           \
    }

#define DEFINE_FWD_BLOCK(VW, MBK)                                                                                   \
    static inline void fwd_block##VW##_##MBK(const float *restrict xg, const float *restrict w,                     \
                                             const float *restrict b, float *restrict yn, const geom_t *g,          \
                                             int64_t o0, int64_t i, int64_t j0, int relu) {                          \
        v##VW acc[MBK];                                                                                             \
        for (int m = 0; m < MBK; m++) acc[m] = (v##VW){0} + (b ? b[o0 + m] : 0.0f);                                 \
        for (int64_t c = 0; c < g->cg; c++)                                                                         \
            for (int64_t ky = 0; ky < g->K; ky++) {                                                                 \
                const float *xr = xg + (c * g->Hp + i + ky) * g->Wp + j0;                                           \
                const float *wr = w + o0 * g->R + (c * g->K + ky) * g->K;                                           \
                for (int64_t kx = 0; kx < g->K; kx++) {                                                             \
                    v##VW xv = load##VW(xr + kx);                                                                   \
                    for (int m = 0; m < MBK; m++) acc[m] += wr[m * g->R + kx] * xv;                                 \
                }                                                                                                   \
            }                                                                                                       \
        for (int m = 0; m < MBK; m++) {                                                                             \
            store##VW(yn + (o0 + m) * g->HWo + i * g->Wo + j0, relu ? relu##VW(acc[m]) : acc[m]);                   \
        }                                                                                                           \
    }

DEFINE_KERNELS(8)
DEFINE_KERNELS(4)
DEFINE_KERNELS(1)

static int vector_width(int64_t Wo) { return Wo % 8 == 0 ? 8 : Wo % 4 == 0 ? 4 : 1; }

/* 4x4 output maps (the host after its pool): the whole 16-value plane is one vector. Each image is
 * unfolded into P[(c, ky, kx)][16] (im2col from the padded copy) and the products run over whole planes. */
typedef float v16 __attribute__((vector_size(16 * sizeof(float))));
static inline v16 load16(const float *p) { v16 v; memcpy(&v, p, sizeof v); return v; }
static inline void store16(float *p, v16 v) { memcpy(p, &v, sizeof v); }
typedef int32_t vi16 __attribute__((vector_size(16 * sizeof(int32_t))));
typedef uint32_t vu16 __attribute__((vector_size(16 * sizeof(uint32_t))));
static inline v16 relu16(v16 v) { return (v16)((vi16)v & ~(vi16)(v < (v16){0})); }

static int is_plane16(const geom_t *g) { return g->Ho == 4 && g->Wo == 4; }

static void im2col_plane16(const float *restrict xp, float *restrict P, const geom_t *g) {
    for (int64_t c = 0; c < g->C; c++)
        for (int64_t ky = 0; ky < g->K; ky++)
            for (int64_t kx = 0; kx < g->K; kx++) {
                float *row = P + ((c * g->K + ky) * g->K + kx) * 16;
                for (int i = 0; i < 4; i++) store4(row + 4 * i, load4(xp + (c * g->Hp + i + ky) * g->Wp + kx));
            }
}

#define DEFINE_PLANE_FWD_BLOCK(MBK)                                                                                 \
    static inline void plane_block_##MBK(const float *restrict Pg, const float *restrict w, const float *restrict b, \
                                         float *restrict yn, const geom_t *g, int64_t o0, int relu) {                \
        v16 acc[MBK];                                                                                               \
        for (int m = 0; m < MBK; m++) acc[m] = (v16){0} + (b ? b[o0 + m] : 0.0f);                                   \
        for (int64_t r = 0; r < g->R; r++) {                                                                        \
            v16 pv = load16(Pg + r * 16);                                                                           \
            for (int m = 0; m < MBK; m++) acc[m] += w[(o0 + m) * g->R + r] * pv;                                    \
        }                                                                                                           \
        for (int m = 0; m < MBK; m++) {                                                                             \
            store16(yn + (o0 + m) * 16, relu ? relu16(acc[m]) : acc[m]);                                            \
        }                                                                                                           \
    }
DEFINE_PLANE_FWD_BLOCK(8)
DEFINE_PLANE_FWD_BLOCK(4)
DEFINE_PLANE_FWD_BLOCK(1)

static void forward_plane16(const float *restrict P, const float *restrict w, const float *restrict b, float *restrict yn,
                            const geom_t *g, int relu) {
    for (int64_t gi = 0; gi < g->groups; gi++) {
        const float *Pg = P + gi * g->R * 16;
        int64_t o = gi * g->og, o1 = o + g->og;
        for (; o + 8 <= o1; o += 8) plane_block_8(Pg, w, b, yn, g, o, relu);
        for (; o + 4 <= o1; o += 4) plane_block_4(Pg, w, b, yn, g, o, relu);
        for (; o < o1; o++) plane_block_1(Pg, w, b, yn, g, o, relu);
    }
}

/* NR (compile-time) rows r0.. of the partial sums of output channel o, and of o + 1 when TWO (then each
 * unfolded row is loaded once for both), over the nc images of a chunk: the sums stay in registers. */
#define DEFINE_PLANE_GW_BLOCK(NR, TWO)                                                                              \
    static inline void plane_gw_block_##NR##_##TWO(const float *restrict Pg, int64_t stride,                        \
                                                   const float *const *Gs, int64_t nc, int64_t o,                   \
                                                   float *restrict part0, float *restrict part1, int64_t r0) {      \
        v16 acc0[NR], acc1[NR];                                                                                     \
        for (int k = 0; k < NR; k++) {                                                                              \
            acc0[k] = load16(part0 + (r0 + k) * 16);                                                                \
            acc1[k] = TWO ? load16(part1 + (r0 + k) * 16) : (v16){0};                                               \
        }                                                                                                           \
        for (int64_t j = 0; j < nc; j++) {                                                                          \
            v16 gv0 = load16(Gs[j] + o * 16), gv1 = TWO ? load16(Gs[j] + (o + 1) * 16) : (v16){0};                  \
            const float *pj = Pg + j * stride + r0 * 16;                                                            \
            for (int k = 0; k < NR; k++) {                                                                          \
                v16 pv = load16(pj + k * 16);                                                                       \
                acc0[k] += gv0 * pv;                                                                                \
                if (TWO) acc1[k] += gv1 * pv;                                                                       \
            }                                                                                                       \
        }                                                                                                           \
        for (int k = 0; k < NR; k++) {                                                                              \
            store16(part0 + (r0 + k) * 16, acc0[k]);                                                                \
            if (TWO) store16(part1 + (r0 + k) * 16, acc1[k]);                                                       \
        }                                                                                                           \
    }
DEFINE_PLANE_GW_BLOCK(8, 1)
DEFINE_PLANE_GW_BLOCK(8, 0)
DEFINE_PLANE_GW_BLOCK(1, 1)
DEFINE_PLANE_GW_BLOCK(1, 0)

/* Weight and bias gradients of nc images (unfolded planes P, `stride` floats apart; output gradients Gs[j]),
 * added to 16-lane partial sums (lane = output position), image after image: the partial sums stay in
 * registers across the images of a chunk instead of being stored after each one. */
static void grad_weight_plane16_chunk(const float *restrict P, int64_t stride, const float *const *Gs, int64_t nc,
                                      float *restrict wpart, float *restrict bpart, const geom_t *g) {
    if (bpart)
        for (int64_t o = 0; o < g->O; o++) {
            v16 acc = load16(bpart + o * 16);
            for (int64_t j = 0; j < nc; j++) acc += load16(Gs[j] + o * 16);
            store16(bpart + o * 16, acc);
        }
    if (!wpart) return;
    for (int64_t o = 0; o < g->O; o++) {
        const float *Pg = P + (o / g->og) * g->R * 16;
        int two = o + 1 < g->O && (o + 1) / g->og == o / g->og; /* o + 1 in the same group */
        float *part0 = wpart + o * g->R * 16, *part1 = part0 + g->R * 16;
        int64_t r0 = 0;
        for (; r0 + 8 <= g->R; r0 += 8) {
            if (two) plane_gw_block_8_1(Pg, stride, Gs, nc, o, part0, part1, r0);
            else plane_gw_block_8_0(Pg, stride, Gs, nc, o, part0, part1, r0);
        }
        for (; r0 < g->R; r0++) {
            if (two) plane_gw_block_1_1(Pg, stride, Gs, nc, o, part0, part1, r0);
            else plane_gw_block_1_0(Pg, stride, Gs, nc, o, part0, part1, r0);
        }
        o += two;
    }
}

/* Input gradient of one image into the padded buffer gxp (zeroed here), through the plane rows GP (scratch P). */
static void grad_input_plane16(const float *restrict w, const float *restrict G, float *restrict GP, float *restrict gxp,
                               const geom_t *g) {
    for (int64_t gi = 0; gi < g->groups; gi++)
        for (int64_t r = 0; r < g->R; r++) {
            v16 acc = (v16){0};
            for (int64_t o = gi * g->og; o < (gi + 1) * g->og; o++) acc += w[o * g->R + r] * load16(G + o * 16);
            store16(GP + (gi * g->R + r) * 16, acc);
        }
    memset(gxp, 0, (size_t)(g->C * g->Hp * g->Wp) * sizeof(float));
    for (int64_t c = 0; c < g->C; c++)
        for (int64_t ky = 0; ky < g->K; ky++)
            for (int64_t kx = 0; kx < g->K; kx++) {
                const float *row = GP + ((c * g->K + ky) * g->K + kx) * 16;
                for (int i = 0; i < 4; i++) {
                    float *dst = gxp + (c * g->Hp + i + ky) * g->Wp + kx;
                    store4(dst, load4(dst) + load4(row + 4 * i));
                }
            }
}

/* 8-wide output rows, an even number of them (the host's 8x8 maps): two output rows per 16-lane vector.
 * Each input channel's padded rows are copied once per kernel column kx into S [C][K][Hp][8] (rows of 8,
 * contiguous), so the two input rows a pair of output rows reads at tap (ky, kx) are one contiguous load.
 * Every output accumulates bias + w * input over (c, ky, kx) in the same order as forward8: the same results. */
static int is_rows8x2(const geom_t *g) { return g->Wo == 8 && g->Ho % 2 == 0; }

static void shift_rows8(const float *restrict xp, float *restrict S, const geom_t *g) {
    for (int64_t c = 0; c < g->C; c++)
        for (int64_t kx = 0; kx < g->K; kx++)
            for (int64_t r = 0; r < g->Hp; r++)
                store8(S + ((c * g->K + kx) * g->Hp + r) * 8, load8(xp + (c * g->Hp + r) * g->Wp + kx));
}

/* MBK output channels x RP row pairs (rows i, i + 2, ... of 8 outputs x 2 rows each) per call: each
 * weight is loaded once for RP vectors and each shifted input row once for MBK channels. */
#define DEFINE_ROWS8_BLOCK(MBK, RP)                                                                                 \
    static inline void rows8_block_##MBK##x##RP(const float *restrict Sg, const float *restrict w,                  \
                                                const float *restrict b, float *restrict yn, const geom_t *g,       \
                                                int64_t o0, int64_t i, int relu) {                                  \
        v16 acc[MBK][RP];                                                                                           \
        for (int m = 0; m < MBK; m++)                                                                               \
            for (int r = 0; r < RP; r++) acc[m][r] = (v16){0} + (b ? b[o0 + m] : 0.0f);                             \
        for (int64_t c = 0; c < g->cg; c++)                                                                         \
            for (int64_t ky = 0; ky < g->K; ky++) {                                                                 \
                const float *wr = w + o0 * g->R + (c * g->K + ky) * g->K;                                           \
                for (int64_t kx = 0; kx < g->K; kx++) {                                                             \
                    const float *row = Sg + ((c * g->K + kx) * g->Hp + i + ky) * 8;                                 \
                    v16 xv[RP];                                                                                     \
                    for (int r = 0; r < RP; r++) xv[r] = load16(row + 16 * r);                                      \
                    for (int m = 0; m < MBK; m++) {                                                                 \
                        float wm = wr[m * g->R + kx];                                                               \
                        for (int r = 0; r < RP; r++) acc[m][r] += wm * xv[r];                                       \
                    }                                                                                               \
                }                                                                                                   \
            }                                                                                                       \
        for (int m = 0; m < MBK; m++)                                                                               \
            for (int r = 0; r < RP; r++)                                                                            \
                store16(yn + (o0 + m) * g->HWo + (i + 2 * r) * 8, relu ? relu16(acc[m][r]) : acc[m][r]);           \
    }
DEFINE_ROWS8_BLOCK(8, 2)
DEFINE_ROWS8_BLOCK(8, 1)
DEFINE_ROWS8_BLOCK(4, 4)
DEFINE_ROWS8_BLOCK(4, 1)
DEFINE_ROWS8_BLOCK(1, 4)
DEFINE_ROWS8_BLOCK(1, 1)

/* Blocks of 8 output channels take 2 row pairs at a time, smaller blocks 4 (16 accumulators either way). */
static void forward_rows8x2(const float *restrict S, const float *restrict w, const float *restrict b, float *restrict yn,
                            const geom_t *g, int relu) {
    for (int64_t gi = 0; gi < g->groups; gi++) {
        const float *Sg = S + gi * g->cg * g->K * g->Hp * 8;
        int64_t o = gi * g->og, o1 = (gi + 1) * g->og, i;
        for (; o + 8 <= o1; o += 8) {
            for (i = 0; i + 4 <= g->Ho; i += 4) rows8_block_8x2(Sg, w, b, yn, g, o, i, relu);
            for (; i < g->Ho; i += 2) rows8_block_8x1(Sg, w, b, yn, g, o, i, relu);
        }
        for (; o + 4 <= o1; o += 4) {
            for (i = 0; i + 8 <= g->Ho; i += 8) rows8_block_4x4(Sg, w, b, yn, g, o, i, relu);
            for (; i < g->Ho; i += 2) rows8_block_4x1(Sg, w, b, yn, g, o, i, relu);
        }
        for (; o < o1; o++) {
            for (i = 0; i + 8 <= g->Ho; i += 8) rows8_block_1x4(Sg, w, b, yn, g, o, i, relu);
            for (; i < g->Ho; i += 2) rows8_block_1x1(Sg, w, b, yn, g, o, i, relu);
        }
    }
}

/* y[n, o] = act(b[o] + sum_{c in group(o), ky, kx} w[o, c, ky, kx] * x[n, c, shifted]); relu: act = max(., 0), NaN kept. */
/* Weight and bias gradients of one image on 8-wide, even-height maps: pairs of output rows (16 lanes) against
 * the shifted input rows of shift_rows8, added to 16-lane partial sums (lane = position within the row pair). */
#define DEFINE_GRAD_ROWS8X2(KS)                                                                                     \
    static void grad_weight_rows8x2_##KS(const float *restrict S, const float *restrict G, float *restrict wpart,    \
                                         float *restrict bpart, const geom_t *g) {                                  \
        for (int64_t o = 0; o < g->O; o++) {                                                                        \
            const float *Go = G + o * g->HWo;                                                                       \
            if (bpart) {                                                                                            \
                v16 acc = load16(bpart + o * 16);                                                                   \
                for (int64_t i = 0; i < g->Ho; i += 2) acc += load16(Go + i * 8);                                   \
                store16(bpart + o * 16, acc);                                                                       \
            }                                                                                                       \
        }                                                                                                           \
        if (!wpart) return;                                                                                         \
        for (int64_t o = 0; o < g->O; o++) {                                                                        \
            const float *Go = G + o * g->HWo, *Sg = S + (o / g->og) * g->cg * KS * g->Hp * 8;                       \
            if (o + 1 < g->O && (o + 1) / g->og == o / g->og) {                                                     \
                /* two output channels of one group: each shifted input row is loaded once for both */              \
                const float *Go1 = Go + g->HWo;                                                                     \
                for (int64_t c = 0; c < g->cg; c++) {                                                               \
                    float *part0 = wpart + (o * g->R + c * KS * KS) * 16, *part1 = part0 + g->R * 16;               \
                    v16 acc0[KS * KS], acc1[KS * KS];                                                               \
                    for (int k = 0; k < KS * KS; k++) acc0[k] = load16(part0 + k * 16), acc1[k] = load16(part1 + k * 16); \
                    for (int64_t i = 0; i < g->Ho; i += 2) {                                                        \
                        v16 gv0 = load16(Go + i * 8), gv1 = load16(Go1 + i * 8);                                    \
                        for (int ky = 0; ky < KS; ky++)                                                             \
                            for (int kx = 0; kx < KS; kx++) {                                                       \
                                v16 sv = load16(Sg + ((c * KS + kx) * g->Hp + i + ky) * 8);                         \
                                acc0[ky * KS + kx] += gv0 * sv;                                                     \
                                acc1[ky * KS + kx] += gv1 * sv;                                                     \
                            }                                                                                       \
                    }                                                                                               \
                    for (int k = 0; k < KS * KS; k++) store16(part0 + k * 16, acc0[k]), store16(part1 + k * 16, acc1[k]); \
                }                                                                                                   \
                o++;                                                                                                \
                continue;                                                                                           \
            }                                                                                                       \
            for (int64_t c = 0; c < g->cg; c++) {                                                                   \
                float *part = wpart + (o * g->R + c * KS * KS) * 16;                                                \
                v16 acc[KS * KS];                                                                                   \
                for (int k = 0; k < KS * KS; k++) acc[k] = load16(part + k * 16);                                   \
                for (int64_t i = 0; i < g->Ho; i += 2) {                                                            \
                    v16 gv = load16(Go + i * 8);                                                                    \
                    for (int ky = 0; ky < KS; ky++)                                                                 \
                        for (int kx = 0; kx < KS; kx++)                                                             \
                            acc[ky * KS + kx] += gv * load16(Sg + ((c * KS + kx) * g->Hp + i + ky) * 8);            \
                }                                                                                                   \
                for (int k = 0; k < KS * KS; k++) store16(part + k * 16, acc[k]);                                   \
            }                                                                                                       \
        }                                                                                                           \
    }
DEFINE_GRAD_ROWS8X2(1)
DEFINE_GRAD_ROWS8X2(3)

/* Floats of scratch that forward_padded needs for geometry g. */
static int64_t forward_scratch(const geom_t *g) {
    return is_rows8x2(g) ? g->C * g->K * g->Hp * 8 : is_plane16(g) ? g->C * g->KK * 16 : 0;
}

/* One image's convolution from its zero-padded copy xp, through the fastest kernel for its shape. */
static void forward_padded(const float *restrict xp, float *restrict scratch, const float *restrict w, const float *restrict b,
                           float *restrict yn, const geom_t *g, int relu) {
    int vw = vector_width(g->Wo);
    if (is_rows8x2(g)) {
        shift_rows8(xp, scratch, g);
        forward_rows8x2(scratch, w, b, yn, g, relu);
    } else if (is_plane16(g)) {
        im2col_plane16(xp, scratch, g);
        forward_plane16(scratch, w, b, yn, g, relu);
    } else if (vw == 8) forward8(xp, w, b, yn, g, relu);
    else if (vw == 4) forward4(xp, w, b, yn, g, relu);
    else forward1(xp, w, b, yn, g, relu);
}

/* y[n, o] = act(b[o] + sum_{c in group(o), ky, kx} w[o, c, ky, kx] * x[n, c, shifted]); relu: act = max(., 0), NaN kept. */
int conv2d_forward(const float *restrict x, const float *restrict w, const float *restrict b, float *restrict y,
                   int64_t N, int64_t C, int64_t H, int64_t W, int64_t O, int64_t K, int64_t pad, int64_t groups,
                   int64_t relu) {
    geom_t g = geometry(N, C, H, W, O, K, pad, groups);
    float *xp = (float *)calloc((size_t)(C * g.Hp * g.Wp + forward_scratch(&g)), sizeof(float));
    if (!xp) return 1;
    for (int64_t n = 0; n < N; n++) {
        pad_image(x + n * C * H * W, xp, &g);
        forward_padded(xp, xp + C * g.Hp * g.Wp, w, b, y + n * O * g.HWo, &g, (int)relu);
    }
    free(xp);
    return 0;
}

/* Gradients of conv2d_forward for the output gradient gy. y: the forward's output when it applied the
 * ReLU (gradient zero where y <= 0, as torch's threshold_backward), else NULL. gx, gw, gb: NULL when
 * not needed; written, not accumulated. */
int conv2d_backward(const float *restrict x, const float *restrict w, const float *restrict gy, const float *restrict y,
                    float *restrict gx, float *restrict gw, float *restrict gb,
                    int64_t N, int64_t C, int64_t H, int64_t W, int64_t O, int64_t K, int64_t pad, int64_t groups) {
    if (K != 1 && K != 3) return 2;
    geom_t g = geometry(N, C, H, W, O, K, pad, groups);
    int plane = is_plane16(&g), rows2 = is_rows8x2(&g);
    int vw = plane || rows2 ? 16 : vector_width(g.Wo); /* lanes of the partial sums */
    int64_t padded = C * g.Hp * g.Wp, scratch = forward_scratch(&g);
    /* 4x4 maps: the weight gradient runs over chunks of CHUNK images (their planes stay in L1), so the output
     * gradients and unfolded planes of a chunk are kept; P's last slot is scratch for the input gradient */
    enum { CHUNK = 8 };
    int64_t chunk = plane ? CHUNK : 1;
    size_t floats = (size_t)(2 * padded + chunk * O * g.HWo + O * g.R * vw + O * vw + (chunk + 1) * scratch);
    float *buf = (float *)calloc(floats, sizeof(float));
    if (!buf) return 1;
    float *xp = buf, *gxp = xp + padded, *G = gxp + padded, *wpart = G + chunk * O * g.HWo, *bpart = wpart + O * g.R * vw;
    float *P = bpart + O * vw, *P_scratch = P + chunk * scratch;
    const float *Gs[CHUNK];
    /* input gradient as a forward convolution (needs K - 1 - pad >= 0): transposed, flipped weights wt
     * [C, O/groups, K, K], the padded output gradient gpad and the forward kernel's scratch */
    int64_t q = K - 1 - pad;
    int gt_ok = gx && q >= 0;
    geom_t gt = geometry(N, O, g.Ho, g.Wo, C, K, gt_ok ? q : 0, groups);
    float *tbuf = NULL, *wt = NULL, *gpad = NULL, *gscratch = NULL;
    if (gt_ok) {
        tbuf = (float *)calloc((size_t)(C * g.og * g.KK + O * gt.Hp * gt.Wp + forward_scratch(&gt)), sizeof(float));
        if (!tbuf) {
            free(buf);
            return 1;
        }
        wt = tbuf;
        gpad = wt + C * g.og * g.KK;
        gscratch = gpad + O * gt.Hp * gt.Wp;
        for (int64_t c = 0; c < C; c++) {
            int64_t gi = c / g.cg, cl = c - gi * g.cg;
            for (int64_t ol = 0; ol < g.og; ol++)
                for (int64_t k = 0; k < g.KK; k++)
                    wt[(c * g.og + ol) * g.KK + k] = w[((gi * g.og + ol) * g.cg + cl) * g.KK + (g.KK - 1 - k)];
        }
    }
    for (int64_t n = 0; n < N; n++) {
        const float *gyn = gy + n * O * g.HWo;
        const float *Gn = gyn;
        int64_t slot = n % chunk;
        if (y) {
            const float *yn = y + n * O * g.HWo;
            float *Gd = G + slot * O * g.HWo;
            for (int64_t q = 0; q < O * g.HWo; q++) Gd[q] = yn[q] <= 0.0f ? 0.0f : gyn[q];
            Gn = Gd;
        }
        if (gw || gb) {
            if (gw) pad_image(x + n * C * H * W, xp, &g);
            float *wp = gw ? wpart : NULL, *bp = gb ? bpart : NULL;
            if (rows2) {
                if (gw) shift_rows8(xp, P, &g);
                if (K == 3) grad_weight_rows8x2_3(P, Gn, wp, bp, &g);
                else grad_weight_rows8x2_1(P, Gn, wp, bp, &g);
            } else if (plane) {
                if (gw) im2col_plane16(xp, P + slot * scratch, &g);
                Gs[slot] = Gn;
                if (slot == chunk - 1 || n == N - 1) grad_weight_plane16_chunk(P, scratch, Gs, slot + 1, wp, bp, &g);
            } else if (K == 3) {
                if (vw == 8) grad_weight8_3(xp, Gn, wp, bp, &g);
                else if (vw == 4) grad_weight4_3(xp, Gn, wp, bp, &g);
                else grad_weight1_3(xp, Gn, wp, bp, &g);
            } else {
                if (vw == 8) grad_weight8_1(xp, Gn, wp, bp, &g);
                else if (vw == 4) grad_weight4_1(xp, Gn, wp, bp, &g);
                else grad_weight1_1(xp, Gn, wp, bp, &g);
            }
        }
        if (gx && gt_ok) {
            /* the input gradient is the convolution of the output gradient, padded by K - 1 - pad, with the
             * weights transposed (in <-> out channels) and flipped: the forward kernels compute it */
            pad_image(Gn, gpad, &gt);
            forward_padded(gpad, gscratch, wt, NULL, gx + n * C * H * W, &gt, 0);
        } else if (gx) {
            if (plane) {
                grad_input_plane16(w, Gn, P_scratch, gxp, &g);
            } else if (K == 3) {
                if (vw == 8) grad_input8_3(w, Gn, gxp, &g);
                else if (vw == 4) grad_input4_3(w, Gn, gxp, &g);
                else grad_input1_3(w, Gn, gxp, &g);
            } else {
                if (vw == 8) grad_input8_1(w, Gn, gxp, &g);
                else if (vw == 4) grad_input4_1(w, Gn, gxp, &g);
                else grad_input1_1(w, Gn, gxp, &g);
            }
            float *gxn = gx + n * C * H * W;
            for (int64_t c = 0; c < C; c++)
                for (int64_t i = 0; i < H; i++)
                    copy_row(gxn + (c * H + i) * W, gxp + (c * g.Hp + i + pad) * g.Wp + pad, W);
        }
    }
    if (gw)
        for (int64_t e = 0; e < O * g.R; e++) {
            float s = 0.0f;
            for (int l = 0; l < vw; l++) s += wpart[e * vw + l];
            gw[e] = s;
        }
    if (gb)
        for (int64_t o = 0; o < O; o++) {
            float s = 0.0f;
            for (int l = 0; l < vw; l++) s += bpart[o * vw + l];
            gb[o] = s;
        }
    free(buf);
    free(tbuf);
    return 0;
}

/* 2x2/2 max-pool (floor mode) of M planes of H x W: y and the window index (0..3, row-major) of the maximum.
 * As torch's max_pool2d: a later value replaces the current maximum when it is larger or NaN, so the first
 * maximum wins and a NaN wins over numbers. With H and W even the rule is applied as (a, b), (c, d), then the
 * two winners, which gives the sequential result without branches; otherwise the window is scanned in order. */
void maxpool2x2_forward(const float *restrict x, float *restrict y, uint8_t *restrict idx, int64_t M, int64_t H, int64_t W) {
    int64_t Ho = H / 2, Wo = W / 2;
    if (W == 8 && H % 2 == 0) {
        /* the host's 8x8 maps: two windows rows (2 x 16 floats) per step, 8 outputs from 16-lane shuffles */
        const vi16 pick_even = {0, 2, 4, 6, 16, 18, 20, 22, 8, 10, 12, 14, 24, 26, 28, 30};
        const vi16 pick_odd = {1, 3, 5, 7, 17, 19, 21, 23, 9, 11, 13, 15, 25, 27, 29, 31};
        const vi16 swap_halves = {8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7};
        int64_t pairs = M * Ho, r = 0;
        for (; r + 2 <= pairs; r += 2) {
            v16 x0 = load16(x + r * 16), x1 = load16(x + r * 16 + 16);
            v16 ac = __builtin_shuffle(x0, x1, pick_even), bd = __builtin_shuffle(x0, x1, pick_odd);
            vi16 sel = (bd > ac) | (bd != bd);                  /* [ts | bs], -1 where the odd column wins */
            v16 tu = (v16)(((vi16)bd & sel) | ((vi16)ac & ~sel)); /* [top winners | bottom winners] */
            v16 ut = __builtin_shuffle(tu, swap_halves);
            vi16 lower = (ut > tu) | (ut != ut);
            v16 best = (v16)(((vi16)ut & lower) | ((vi16)tu & ~lower));
            vi16 sel_swapped = __builtin_shuffle(sel, swap_halves);
            vi16 k = (lower & (2 - sel_swapped)) | (~lower & -sel);
            memcpy(y + r * 4, &best, 8 * sizeof(float));
            for (int l = 0; l < 8; l++) idx[r * 4 + l] = (uint8_t)k[l];
        }
        if (r == pairs) return;
        x += r * 16; y += r * 4; idx += r * 4; M = 1; H = 2 * (pairs - r); Ho = H / 2;
    }
    if (H % 2 == 0 && W % 2 == 0 && W <= 1024) {
        /* in chunks of rows: the maxima of the horizontal pairs (a contiguous, vectorised pass), then of
         * the two pair maxima of each window */
        enum { CHUNK = 2048 };
        float hmax[CHUNK];
        uint8_t hsel[CHUNK];
        int64_t rows = CHUNK / (W / 2) / 2 * 2, total = M * H; /* an even number of rows per chunk */
        for (int64_t r0 = 0; r0 < total; r0 += rows) {
            int64_t nr = total - r0 < rows ? total - r0 : rows, E = nr * Wo;
            const float *xc = x + r0 * W;
            for (int64_t e = 0; e < E; e++) {
                float a = xc[2 * e], b = xc[2 * e + 1];
                uint8_t t = (b > a) | (b != b);
                hmax[e] = t ? b : a;
                hsel[e] = t;
            }
            for (int64_t r = 0; r < nr / 2; r++) {
                const float *top = hmax + 2 * r * Wo, *bot = top + Wo;
                const uint8_t *ts = hsel + 2 * r * Wo, *bs = ts + Wo;
                float *yr = y + (r0 / 2 + r) * Wo;
                uint8_t *ir = idx + (r0 / 2 + r) * Wo;
                for (int64_t j = 0; j < Wo; j++) {
                    uint8_t t = (bot[j] > top[j]) | (bot[j] != bot[j]);
                    yr[j] = t ? bot[j] : top[j];
                    ir[j] = t ? (uint8_t)(2 + bs[j]) : ts[j];
                }
            }
        }
        return;
    }
    for (int64_t m = 0; m < M; m++) {
        const float *xm = x + m * H * W;
        for (int64_t i = 0; i < Ho; i++) {
            const float *r0 = xm + 2 * i * W, *r1 = r0 + W;
            float *yr = y + (m * Ho + i) * Wo;
            uint8_t *ir = idx + (m * Ho + i) * Wo;
            for (int64_t j = 0; j < Wo; j++) {
                float best = r0[2 * j];
                uint8_t k = 0;
                float v1 = r0[2 * j + 1], v2 = r1[2 * j], v3 = r1[2 * j + 1];
                if (v1 > best || v1 != v1) { best = v1; k = 1; }
                if (v2 > best || v2 != v2) { best = v2; k = 2; }
                if (v3 > best || v3 != v3) { best = v3; k = 3; }
                yr[j] = best;
                ir[j] = k;
            }
        }
    }
}

/* Gradient of maxpool2x2_forward: each output's gradient goes to its window's maximum, the rest is 0. */
void maxpool2x2_backward(const float *restrict gy, const uint8_t *restrict idx, float *restrict gx, int64_t M, int64_t H, int64_t W) {
    int64_t Ho = H / 2, Wo = W / 2;
    memset(gx, 0, (size_t)(M * H * W) * sizeof(float));
    for (int64_t m = 0; m < M; m++)
        for (int64_t i = 0; i < Ho; i++)
            for (int64_t j = 0; j < Wo; j++) {
                int64_t q = (m * Ho + i) * Wo + j;
                uint8_t k = idx[q];
                gx[m * H * W + (2 * i + (k >> 1)) * W + 2 * j + (k & 1)] = gy[q];
            }
}

/* The host's classifier and loss for N images: hmean[n, c] = mean over the HW positions of h[n, c];
 * logits = hmean w^T + b ([N, K], b may be NULL); probs = softmax(logits); loss = mean over n of
 * logsumexp(logits[n]) - logits[n, y[n]] (cross-entropy). Returns 0, or 3 when a label is outside [0, K). */
int head_loss_forward(const float *restrict h, const float *restrict w, const float *restrict b, const int64_t *restrict y,
                      float *restrict hmean, float *restrict logits, float *restrict probs, float *restrict loss,
                      int64_t N, int64_t C, int64_t HW, int64_t K) {
    double total = 0.0;
    for (int64_t n = 0; n < N; n++) {
        if (y[n] < 0 || y[n] >= K) return 3;
        float *hm = hmean + n * C, *ln = logits + n * K, *pn = probs + n * K;
        for (int64_t c = 0; c < C; c++) {
            const float *hc = h + (n * C + c) * HW;
            float s = 0.0f;
            for (int64_t q = 0; q < HW; q++) s += hc[q];
            hm[c] = s / (float)HW;
        }
        float top = -INFINITY;
        for (int64_t k = 0; k < K; k++) {
            float a = b ? b[k] : 0.0f;
            for (int64_t c = 0; c < C; c++) a += hm[c] * w[k * C + c];
            ln[k] = a;
            if (a > top || a != a) top = a;
        }
        double se = 0.0;
        for (int64_t k = 0; k < K; k++) {
            pn[k] = expf(ln[k] - top);
            se += pn[k];
        }
        for (int64_t k = 0; k < K; k++) pn[k] = (float)(pn[k] / se);
        total += (double)top + log(se) - (double)ln[y[n]];
    }
    *loss = (float)(total / (double)N);
    return 0;
}

/* Gradients of head_loss_forward for the loss gradient gloss: gh [N, C, HW] (NULL: not needed), gw [K, C]
 * and gb [K] (NULL: not needed), from the forward's hmean and probs. Written, not accumulated. Returns 0, or 1
 * when out of memory. */
int head_loss_backward(float gloss, const float *restrict probs, const int64_t *restrict y, const float *restrict hmean,
                        const float *restrict w, float *restrict gh, float *restrict gw, float *restrict gb,
                        int64_t N, int64_t C, int64_t HW, int64_t K) {
    float scale = gloss / (float)N;
    if (gw) memset(gw, 0, (size_t)(K * C) * sizeof(float));
    if (gb) memset(gb, 0, (size_t)K * sizeof(float));
    float *d = (float *)malloc((size_t)(K > 0 ? K : 1) * sizeof(float));
    if (!d) return 1;
    for (int64_t n = 0; n < N; n++) {
        for (int64_t k = 0; k < K; k++) d[k] = (probs[n * K + k] - (k == y[n] ? 1.0f : 0.0f)) * scale;
        for (int64_t k = 0; k < K; k++) {
            if (gb) gb[k] += d[k];
            if (gw)
                for (int64_t c = 0; c < C; c++) gw[k * C + c] += d[k] * hmean[n * C + c];
        }
        if (gh)
            for (int64_t c = 0; c < C; c++) {
                float g = 0.0f;
                for (int64_t k = 0; k < K; k++) g += d[k] * w[k * C + c];
                g /= (float)HW;
                float *ghc = gh + (n * C + c) * HW;
                for (int64_t q = 0; q < HW; q++) ghc[q] = g;
            }
    }
    free(d);
    return 0;
}

/* Euclidean norm of n gradient tensors together (accumulated in double, rounded to float). */
float grad_norm(int64_t n, float *const *grads, const int64_t *sizes) {
    double acc = 0.0;
    for (int64_t i = 0; i < n; i++)
        for (int64_t j = 0; j < sizes[i]; j++) acc += (double)grads[i][j] * (double)grads[i][j];
    return (float)sqrt(acc);
}

/* Gradient clipping then one Adam step (no weight decay) for n parameter tensors, in place: the global
 * norm of the gradients (accumulated in double) goes to *norm; the gradients are scaled by
 * min(1, max_norm / (norm + 1e-6)) (written back, as clip_grad_norm_ does); then for each tensor i the
 * step count *steps[i] grows by one and p -= lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
 * with m = beta1 m + (1 - beta1) g and v = beta2 v + (1 - beta2) g^2. A non-finite norm propagates as in torch. */
void clip_adam(int64_t n, float *const *params, float *const *grads, float *const *exp_avgs, float *const *exp_avg_sqs,
               float *const *steps, const int64_t *sizes, double lr, double beta1, double beta2, double eps,
               double max_norm, float *norm) {
    float total = grad_norm(n, grads, sizes);
    float coef = (float)max_norm / (total + 1e-6f);
    if (coef > 1.0f) coef = 1.0f;
    *norm = total;
    float b1 = (float)beta1, b2 = (float)beta2, e = (float)eps;
    for (int64_t i = 0; i < n; i++) {
        float t = *steps[i] + 1.0f;
        *steps[i] = t;
        float step_size = (float)(lr / (1.0 - pow(beta1, t)));
        float bc2_sqrt = (float)sqrt(1.0 - pow(beta2, t));
        float *p = params[i], *g = grads[i], *m = exp_avgs[i], *v = exp_avg_sqs[i];
        for (int64_t j = 0; j < sizes[i]; j++) {
            float gj = g[j] * coef;
            g[j] = gj;
            float mj = b1 * m[j] + (1.0f - b1) * gj;
            float vj = b2 * v[j] + (1.0f - b2) * gj * gj;
            m[j] = mj;
            v[j] = vj;
            p[j] -= step_size * mj / (sqrtf(vj) / bc2_sqrt + e);
        }
    }
}

/* ---- Seeds in the host's slots (esper_lib.envs.blueprints, lifecycle.SeedSlot) ----
 * A seed's body maps h [n, C, H, W] to s of the same shape: a NORM seed is s = gamma * norm(h) + beta (GroupNorm,
 * G groups, eps 1e-5, biased variance); a convolution seed is a chain of up to MAX_SEED_LAYERS size-preserving
 * convolutions (bias, K 1 or 3, padding (K - 1) / 2, groups), each optionally followed by a ReLU; an ATTENTION seed
 * is s = scale * h * ca(h) * sa(h) with ca = sigmoid(w2 relu(w1 mean_hw(h) + b1) + b2) [n, C] (1x1 convolutions
 * C -> mid -> C) and sa = sigmoid(3x3 convolution of [mean_c(h), max_c(h)] + sb) [n, H, W]. Its delta d is
 * s (LINEAR_ADD), h * s (LINEAR_MULTIPLY), 2 sigmoid(s) - 1 (SIGMOID_ADD) or gate * s (GATED_GATE, gate[n, c] =
 * sigmoid(gate_w[c] mean_hw(h[n, c]) + gate_b[c])). The slot's output is h while the seed is TRAINING (it learns
 * from the loss as if blended at alpha 1, the host does not see it) and h + alpha d in the stream. */
enum { SLOT_PASS = 0, SLOT_TRAINING = 1, SLOT_STREAM = 2, SLOT_FOSSIL = 3 };
enum { STYLE_ADD = 0, STYLE_MULTIPLY = 1, STYLE_SIGMOID = 2, STYLE_GATED = 3 };
enum { BODY_NORM = 0, BODY_CONVS = 1, BODY_ATTENTION = 2 };
enum { MAX_SEED_LAYERS = 4, SEED_PTRS = 2 * MAX_SEED_LAYERS + 2, SLOT_INTS = 6 + 4 * MAX_SEED_LAYERS };

typedef struct {
    int64_t mode, style, body, G, n_layers, n_step; /* n_step: the parameters that get gradients (with the gate's) */
    int64_t layer[MAX_SEED_LAYERS][4];              /* per convolution: output channels, K, groups, ReLU flag */
    int64_t C, H, W, HW, maxc;
    float alpha;
    double lr;
    /* body parameters (gamma, beta, or w_0, b_0, w_1, ...), then gate_w, gate_b: pointers, gradients, Adam state */
    float *const *p, *const *g, *const *m, *const *v, *const *t;
    int64_t sizes[SEED_PTRS];
    /* per-minibatch buffers */
    float *z, *s, *xhat, *gs, *gh, *ga, *gb, *rstd, *gate, *hmean, *act[MAX_SEED_LAYERS];
    float *pooled, *u, *ca, *maps, *sa; /* ATTENTION: mean_hw(h) [n, C], hidden [n, mid], ca [n, C], [n, 2, HW], [n, HW] */
} seed_t;

/* exp for the seeds' sigmoids, in 16-lane vectors and in scalar form with the same operations (so a value does not
 * depend on which of the two computes it): x clamped to [-87.3, 88.3], x = n ln2 + r with |r| <= ln2 / 2 (ln2 in
 * two parts), e^r by its Taylor polynomial of degree 7 (relative error < 2e-7), times 2^n built in the exponent
 * bits. libm's expf is a call per value: the sigmoid style made it 3% of a random-controller step. */
#define EXP_LO (-87.3f)
#define EXP_HI 88.3f
#define EXP_MAGIC 12582912.0f /* 1.5 * 2^23: t = x log2(e) + EXP_MAGIC holds round(x log2(e)) in its low bits */
#define EXP_LOG2E 1.44269504f
#define EXP_LN2_HI 0.693145752f
#define EXP_LN2_LO 1.42860677e-6f

static inline v16 exp16(v16 x) {
    vi16 low = (vi16)(x < EXP_LO), high = (vi16)(x > EXP_HI);
    x = (v16)(((vi16)x & ~low) | ((vi16)((v16){0} + EXP_LO) & low));
    x = (v16)(((vi16)x & ~high) | ((vi16)((v16){0} + EXP_HI) & high));
    v16 t = x * EXP_LOG2E + EXP_MAGIC;
    v16 n = t - EXP_MAGIC;
    v16 r = x - n * EXP_LN2_HI;
    r = r - n * EXP_LN2_LO;
    v16 p = r * (1.0f / 5040) + (1.0f / 720);
    p = p * r + (1.0f / 120);
    p = p * r + (1.0f / 24);
    p = p * r + (1.0f / 6);
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    vu16 bits = ((vu16)t - (vu16)((v16){0} + EXP_MAGIC) + 127) << 23; /* unsigned: a NaN's bits wrap, no overflow */
    return p * (v16)bits;
}

static inline float exp1(float x) {
    x = x < EXP_LO ? EXP_LO : x > EXP_HI ? EXP_HI : x;
    float t = fmaf(x, EXP_LOG2E, EXP_MAGIC);
    float n = t - EXP_MAGIC;
    float r = fmaf(-n, EXP_LN2_HI, x);
    r = fmaf(-n, EXP_LN2_LO, r);
    float p = fmaf(r, 1.0f / 5040, 1.0f / 720);
    p = fmaf(p, r, 1.0f / 120);
    p = fmaf(p, r, 1.0f / 24);
    p = fmaf(p, r, 1.0f / 6);
    p = fmaf(p, r, 0.5f);
    p = fmaf(p, r, 1.0f);
    p = fmaf(p, r, 1.0f);
    uint32_t ti, mi;
    float magic = EXP_MAGIC, scale;
    memcpy(&ti, &t, sizeof ti);
    memcpy(&mi, &magic, sizeof mi);
    uint32_t bits = (ti - mi + 127) << 23;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

static float sigmoidf(float u) { return 1.0f / (1.0f + exp1(-u)); }

/* out[q] = sigmoid(in[q]) for n values (in place allowed). */
static void sigmoid_n(const float *in, float *out, int64_t n) {
    int64_t q = 0;
    for (; q + 16 <= n; q += 16) store16(out + q, 1.0f / (1.0f + exp16(-load16(in + q))));
    for (; q < n; q++) out[q] = sigmoidf(in[q]);
}

/* Sums over n floats with 16 partial sums (lane = index mod 16, added in lane order) when n is a multiple of 16,
 * else in order: a single running sum waits on each add, 16 of them run in parallel. */
static inline float lanes_total(v16 acc) {
    float t = 0.0f;
    for (int l = 0; l < 16; l++) t += acc[l];
    return t;
}

static float sum_f(const float *restrict a, int64_t n) {
    if (n % 16) {
        float t = 0.0f;
        for (int64_t q = 0; q < n; q++) t += a[q];
        return t;
    }
    v16 acc = {0};
    for (int64_t q = 0; q < n; q += 16) acc += load16(a + q);
    return lanes_total(acc);
}

/* sum of a[q] * b[q] (b NULL: sum of (a[q] - shift)^2) */
static float dot_f(const float *restrict a, const float *restrict b, float shift, int64_t n) {
    if (n % 16) {
        float t = 0.0f;
        for (int64_t q = 0; q < n; q++) t += b ? a[q] * b[q] : (a[q] - shift) * (a[q] - shift);
        return t;
    }
    v16 acc = {0};
    for (int64_t q = 0; q < n; q += 16) {
        v16 u = load16(a + q);
        if (b) acc += u * load16(b + q);
        else acc += (u - shift) * (u - shift);
    }
    return lanes_total(acc);
}

/* Floats of one seed's buffers for minibatches of B; with `base`, also points the buffers into it. */
static int64_t seed_buffers(seed_t *sd, int64_t B, float *base) {
    int64_t plane = B * sd->C * sd->HW, wide = B * sd->maxc * sd->HW, used = 0;
#define TAKE(ptr, count) do { if (base) (ptr) = base + used; used += (count); } while (0)
    TAKE(sd->z, plane);
    TAKE(sd->gs, plane);
    TAKE(sd->gh, plane);
    TAKE(sd->gate, B * sd->C);
    TAKE(sd->hmean, B * sd->C);
    if (sd->body == BODY_NORM) {
        TAKE(sd->s, plane);
        TAKE(sd->xhat, plane);
        TAKE(sd->rstd, B * sd->G);
    } else if (sd->body == BODY_ATTENTION) {
        TAKE(sd->s, plane);
        TAKE(sd->pooled, B * sd->C);
        TAKE(sd->u, B * sd->G);
        TAKE(sd->ca, B * sd->C);
        TAKE(sd->maps, B * 2 * (sd->H + 2) * (sd->W + 2)); /* zero-padded for the 3x3 convolution */
        TAKE(sd->sa, B * sd->HW);
        TAKE(sd->ga, 2 * sd->HW + 2 * (sd->H + 2) * (sd->W + 2) + sd->W); /* backward: gsa, gt, the padded maps' gradients, row sums */
    } else {
        for (int64_t j = 0; j < sd->n_layers; j++) TAKE(sd->act[j], B * sd->layer[j][0] * sd->HW);
        TAKE(sd->ga, wide);
        TAKE(sd->gb, wide);
        if (base) sd->s = sd->act[sd->n_layers - 1];
    }
#undef TAKE
    return used;
}

/* 3x3 convolution of the 2 zero-padded maps mp [2, H + 2, W + 2] with w [2, 3, 3] plus b: out [H, W]. Every output
 * adds its 18 terms in the order (k, dy, dx), vectorised along the row. */
static void spatial_conv(const float *restrict mp, const float *restrict w, float b, float *restrict out, int64_t H, int64_t W) {
    int64_t Wp = W + 2, HWp = (H + 2) * Wp;
    for (int64_t i = 0; i < H; i++) {
        float *o = out + i * W;
        for (int64_t j = 0; j < W; j++) o[j] = b;
        for (int64_t k = 0; k < 2; k++)
            for (int64_t dy = 0; dy < 3; dy++)
                for (int64_t dx = 0; dx < 3; dx++) {
                    const float *m = mp + k * HWp + (i + dy) * Wp + dx;
                    float wk = w[k * 9 + dy * 3 + dx];
                    for (int64_t j = 0; j < W; j++) o[j] = fmaf(wk, m[j], o[j]);
                }
    }
}

/* ATTENTION body: parameters scale [C], w1 [mid, C], b1 [mid], w2 [C, mid], b2 [C], sw [2, 3, 3], sb [1]. */
static void attention_forward(seed_t *sd, const float *restrict h, int64_t n) {
    int64_t C = sd->C, HW = sd->HW, mid = sd->G, W = sd->W, Wp = sd->W + 2, HWp = (sd->H + 2) * Wp;
    const float *scale = sd->p[0], *w1 = sd->p[1], *b1 = sd->p[2], *w2 = sd->p[3], *b2 = sd->p[4], *sw = sd->p[5], *sb = sd->p[6];
    for (int64_t i = 0; i < n; i++) {
        const float *hi = h + i * C * HW;
        float *pooled = sd->pooled + i * C, *u = sd->u + i * mid, *ca = sd->ca + i * C, *maps = sd->maps + i * 2 * HWp;
        float *sa = sd->sa + i * HW;
        for (int64_t c = 0; c < C; c++) pooled[c] = sum_f(hi + c * HW, HW) / (float)HW;
        for (int64_t j = 0; j < mid; j++) {
            float a = b1[j];
            for (int64_t c = 0; c < C; c++) a = fmaf(w1[j * C + c], pooled[c], a);
            u[j] = a > 0.0f ? a : 0.0f;
        }
        for (int64_t c = 0; c < C; c++) {
            float a = b2[c];
            for (int64_t j = 0; j < mid; j++) a = fmaf(w2[c * mid + j], u[j], a);
            ca[c] = sigmoidf(a);
        }
        memset(maps, 0, (size_t)(2 * HWp) * sizeof(float));
        for (int64_t q = 0; q < HW; q++) {
            float mean = 0.0f, top = hi[q];
            for (int64_t c = 0; c < C; c++) {
                float v = hi[c * HW + q];
                mean += v;
                if (v > top || v != v) top = v;
            }
            int64_t at = (q / W + 1) * Wp + q % W + 1;
            maps[at] = mean / (float)C;
            maps[HWp + at] = top;
        }
        spatial_conv(maps, sw, sb[0], sa, sd->H, sd->W);
        sigmoid_n(sa, sa, HW);
        for (int64_t c = 0; c < C; c++)
            for (int64_t q = 0; q < HW; q++) sd->s[(i * C + c) * HW + q] = scale[c] * hi[c * HW + q] * ca[c] * sa[q];
    }
}

/* Gradients of attention_forward for gs = dL/ds: the parameters' (written, not accumulated) and, when gh is not
 * NULL, dL/dh added to gh. The channel max passes its gradient to every channel that attains it, in equal shares
 * (as torch's amax). */
static void attention_backward(seed_t *sd, const float *restrict h, int64_t n, float *gh) {
    int64_t C = sd->C, HW = sd->HW, mid = sd->G, H = sd->H, W = sd->W, Wp = W + 2, HWp = (H + 2) * Wp;
    const float *scale = sd->p[0], *w1 = sd->p[1], *w2 = sd->p[3], *sw = sd->p[5];
    float *dscale = sd->g[0], *dw1 = sd->g[1], *db1 = sd->g[2], *dw2 = sd->g[3], *db2 = sd->g[4], *dsw = sd->g[5], *dsb = sd->g[6];
    memset(dscale, 0, (size_t)C * sizeof(float));
    memset(dw1, 0, (size_t)(mid * C) * sizeof(float));
    memset(db1, 0, (size_t)mid * sizeof(float));
    memset(dw2, 0, (size_t)(C * mid) * sizeof(float));
    memset(db2, 0, (size_t)C * sizeof(float));
    memset(dsw, 0, 18 * sizeof(float));
    dsb[0] = 0.0f;
    float *gsa = sd->ga, *gt = gsa + HW, *gmaps = gt + HW, *lanes = gmaps + 2 * HWp;
    float gca[64], gu[64];
    if (C > 64 || mid > 64) return; /* checked by the caller */
    for (int64_t i = 0; i < n; i++) {
        const float *hi = h + i * C * HW, *gsi = sd->gs + i * C * HW;
        const float *pooled = sd->pooled + i * C, *u = sd->u + i * mid, *ca = sd->ca + i * C, *maps = sd->maps + i * 2 * HWp;
        const float *sa = sd->sa + i * HW;
        for (int64_t q = 0; q < HW; q++) gsa[q] = 0.0f;
        for (int64_t c = 0; c < C; c++) {
            float ds = 0.0f, dca = 0.0f;
            for (int64_t q = 0; q < HW; q++) {
                float g = gsi[c * HW + q], hv = hi[c * HW + q];
                ds = fmaf(g * hv * ca[c], sa[q], ds);
                dca = fmaf(g * scale[c] * hv, sa[q], dca);
                gsa[q] += g * scale[c] * hv * ca[c];
                if (gh) gh[(i * C + c) * HW + q] += g * scale[c] * ca[c] * sa[q];
            }
            dscale[c] += ds;
            gca[c] = dca * ca[c] * (1.0f - ca[c]); /* through the sigmoid */
            db2[c] += gca[c];
        }
        for (int64_t j = 0; j < mid; j++) {
            float a = 0.0f;
            for (int64_t c = 0; c < C; c++) {
                dw2[c * mid + j] += gca[c] * u[j];
                a = fmaf(gca[c], w2[c * mid + j], a);
            }
            gu[j] = u[j] > 0.0f ? a : 0.0f;
            db1[j] += gu[j];
            for (int64_t c = 0; c < C; c++) dw1[j * C + c] += gu[j] * pooled[c];
        }
        float tsum = 0.0f;
        for (int64_t q = 0; q < HW; q++) {
            gt[q] = gsa[q] * sa[q] * (1.0f - sa[q]);
            tsum += gt[q];
        }
        dsb[0] += tsum;
        /* the spatial weights: per tap, row-wise partial sums (a lane per column), then the lanes in order */
        for (int64_t k = 0; k < 2; k++)
            for (int64_t dy = 0; dy < 3; dy++)
                for (int64_t dx = 0; dx < 3; dx++) {
                    for (int64_t x0 = 0; x0 < W; x0++) lanes[x0] = 0.0f;
                    for (int64_t y0 = 0; y0 < H; y0++) {
                        const float *m = maps + k * HWp + (y0 + dy) * Wp + dx, *g = gt + y0 * W;
                        for (int64_t x0 = 0; x0 < W; x0++) lanes[x0] = fmaf(g[x0], m[x0], lanes[x0]);
                    }
                    float a = 0.0f;
                    for (int64_t x0 = 0; x0 < W; x0++) a += lanes[x0];
                    dsw[k * 9 + dy * 3 + dx] += a;
                }
        if (!gh) continue;
        for (int64_t q = 0; q < 2 * HWp; q++) gmaps[q] = 0.0f;
        for (int64_t k = 0; k < 2; k++)
            for (int64_t dy = 0; dy < 3; dy++)
                for (int64_t dx = 0; dx < 3; dx++) {
                    float wk = sw[k * 9 + dy * 3 + dx];
                    for (int64_t y0 = 0; y0 < H; y0++) {
                        float *gm = gmaps + k * HWp + (y0 + dy) * Wp + dx;
                        const float *g = gt + y0 * W;
                        for (int64_t x0 = 0; x0 < W; x0++) gm[x0] = fmaf(g[x0], wk, gm[x0]);
                    }
                }
        for (int64_t c = 0; c < C; c++) {
            float gp = 0.0f;
            for (int64_t j = 0; j < mid; j++) gp = fmaf(gu[j], w1[j * C + c], gp);
            gp /= (float)HW;
            for (int64_t q = 0; q < HW; q++) gh[(i * C + c) * HW + q] += gp + gmaps[(q / W + 1) * Wp + q % W + 1] / (float)C;
        }
        for (int64_t q = 0; q < HW; q++) {
            int64_t at = HWp + (q / W + 1) * Wp + q % W + 1, ties = 0;
            for (int64_t c = 0; c < C; c++) ties += hi[c * HW + q] == maps[at];
            if (ties == 0) continue; /* a NaN maximum */
            float share = gmaps[at] / (float)ties;
            for (int64_t c = 0; c < C; c++)
                if (hi[c * HW + q] == maps[at]) gh[(i * C + c) * HW + q] += share;
        }
    }
}

/* s = body(h) for n images (and what the backward needs). Returns 0, or 1 when out of memory. */
static int seed_body_forward(seed_t *sd, const float *restrict h, int64_t n) {
    int64_t C = sd->C, HW = sd->HW;
    if (sd->body == BODY_ATTENTION) {
        attention_forward(sd, h, n);
        return 0;
    }
    if (sd->body == BODY_CONVS) {
        const float *in = h;
        int64_t cin = C;
        for (int64_t j = 0; j < sd->n_layers; j++) {
            int64_t O = sd->layer[j][0], K = sd->layer[j][1];
            if (conv2d_forward(in, sd->p[2 * j], sd->p[2 * j + 1], sd->act[j], n, cin, sd->H, sd->W, O, K, (K - 1) / 2,
                               sd->layer[j][2], sd->layer[j][3]))
                return 1;
            in = sd->act[j];
            cin = O;
        }
        return 0;
    }
    int64_t G = sd->G, cg = C / G, M = cg * HW;
    const float *gamma = sd->p[0], *beta = sd->p[1];
    for (int64_t i = 0; i < n; i++) {
        for (int64_t gi = 0; gi < G; gi++) {
            const float *hg = h + (i * C + gi * cg) * HW;
            float mu = sum_f(hg, M) / (float)M, s2 = dot_f(hg, NULL, mu, M);
            float rstd = (float)(1.0 / sqrt((double)(s2 / (float)M) + 1e-5)), muf = mu;
            sd->rstd[i * G + gi] = rstd;
            float *xh = sd->xhat + (i * C + gi * cg) * HW;
            for (int64_t q = 0; q < M; q++) xh[q] = (hg[q] - muf) * rstd;
        }
        for (int64_t c = 0; c < C; c++) {
            int64_t o = (i * C + c) * HW;
            for (int64_t q = 0; q < HW; q++) sd->s[o + q] = gamma[c] * sd->xhat[o + q] + beta[c];
        }
    }
    return 0;
}

/* h [n, C, H, W] -> sd->z, the slot's output (h itself while TRAINING: the caller reads h then). */
static int seed_forward(seed_t *sd, const float *restrict h, int64_t n) {
    if (seed_body_forward(sd, h, n)) return 1;
    int64_t C = sd->C, HW = sd->HW;
    const float *gate_w = NULL, *gate_b = NULL;
    if (sd->style == STYLE_GATED) {
        gate_w = sd->p[sd->n_step - 2];
        gate_b = sd->p[sd->n_step - 1];
    }
    for (int64_t i = 0; i < n; i++)
        for (int64_t c = 0; c < C; c++) {
            int64_t o = (i * C + c) * HW;
            if (sd->style == STYLE_GATED) {
                float a = sum_f(h + o, HW) / (float)HW;
                sd->hmean[i * C + c] = a;
                sd->gate[i * C + c] = sigmoidf(gate_w[c] * a + gate_b[c]);
            }
            if (sd->mode == SLOT_TRAINING) continue;
            const float *hc = h + o, *sc = sd->s + o;
            float *zc = sd->z + o, al = sd->alpha;
            switch (sd->style) { /* one loop per style, so that each vectorises */
            case STYLE_ADD:
                for (int64_t q = 0; q < HW; q++) zc[q] = hc[q] + al * sc[q];
                break;
            case STYLE_MULTIPLY:
                for (int64_t q = 0; q < HW; q++) zc[q] = hc[q] + al * (hc[q] * sc[q]);
                break;
            case STYLE_SIGMOID:
                sigmoid_n(sc, zc, HW); /* zc holds sigmoid(s) until the next line */
                for (int64_t q = 0; q < HW; q++) zc[q] = hc[q] + al * (2.0f * zc[q] - 1.0f);
                break;
            default: {
                float gt = sd->gate[i * C + c];
                for (int64_t q = 0; q < HW; q++) zc[q] = hc[q] + al * (gt * sc[q]);
            }
            }
        }
    return 0;
}

/* Gradients for the output gradient gz [n, C, H, W]: the seed's parameter gradients (written, not accumulated)
 * and, in the stream, the gradient for h in sd->gh (while TRAINING the gradient for h is gz itself). Returns 0,
 * or 1 when out of memory. */
static int seed_backward(seed_t *sd, const float *restrict h, const float *restrict gz, int64_t n) {
    int64_t C = sd->C, HW = sd->HW;
    int stream = sd->mode != SLOT_TRAINING;
    float a = stream ? sd->alpha : 1.0f;
    float *dgate_w = NULL, *dgate_b = NULL;
    const float *gate_w = NULL;
    if (sd->style == STYLE_GATED) {
        gate_w = sd->p[sd->n_step - 2];
        dgate_w = sd->g[sd->n_step - 2];
        dgate_b = sd->g[sd->n_step - 1];
        memset(dgate_w, 0, (size_t)C * sizeof(float));
        memset(dgate_b, 0, (size_t)C * sizeof(float));
    }
    /* the style: gs = dL/ds, and gh = gz + the direct terms */
    if (stream) memcpy(sd->gh, gz, (size_t)(n * C * HW) * sizeof(float));
    for (int64_t i = 0; i < n; i++)
        for (int64_t c = 0; c < C; c++) {
            int64_t o = (i * C + c) * HW;
            float gate = sd->style == STYLE_GATED ? sd->gate[i * C + c] : 1.0f, ggate = 0.0f;
            const float *gzc = gz + o, *hc = h + o, *sc = sd->s + o;
            float *gsc = sd->gs + o, *ghc = sd->gh + o;
            switch (sd->style) { /* gs = dL/ds; in the stream gh = gz + dL/dh through d's own h */
            case STYLE_ADD:
                for (int64_t q = 0; q < HW; q++) gsc[q] = a * gzc[q];
                break;
            case STYLE_MULTIPLY:
                for (int64_t q = 0; q < HW; q++) gsc[q] = (a * gzc[q]) * hc[q];
                if (stream)
                    for (int64_t q = 0; q < HW; q++) ghc[q] += (a * gzc[q]) * sc[q];
                break;
            case STYLE_SIGMOID:
                sigmoid_n(sc, gsc, HW);
                for (int64_t q = 0; q < HW; q++) gsc[q] = (a * gzc[q]) * 2.0f * gsc[q] * (1.0f - gsc[q]);
                break;
            default:
                for (int64_t q = 0; q < HW; q++) gsc[q] = (a * gzc[q]) * gate;
                for (int64_t q = 0; q < HW; q++) ggate = fmaf(a * gzc[q], sc[q], ggate);
            }
            if (sd->style == STYLE_GATED) {
                float gu = ggate * gate * (1.0f - gate);
                dgate_w[c] += gu * sd->hmean[i * C + c];
                dgate_b[c] += gu;
                if (stream)
                    for (int64_t q = 0; q < HW; q++) sd->gh[i * C * HW + c * HW + q] += gu * gate_w[c] / (float)HW;
            }
        }
    if (sd->body == BODY_ATTENTION) {
        attention_backward(sd, h, n, stream ? sd->gh : NULL);
        return 0;
    }
    if (sd->body == BODY_CONVS) {
        const float *g = sd->gs;
        float *bufs[2] = {sd->ga, sd->gb};
        for (int64_t j = sd->n_layers - 1; j >= 0; j--) {
            int64_t O = sd->layer[j][0], K = sd->layer[j][1], cin = j > 0 ? sd->layer[j - 1][0] : C;
            const float *in = j > 0 ? sd->act[j - 1] : h;
            float *gx = j > 0 || stream ? bufs[j % 2] : NULL;
            if (conv2d_backward(in, sd->p[2 * j], g, sd->layer[j][3] ? sd->act[j] : NULL, gx, sd->g[2 * j], sd->g[2 * j + 1],
                                n, cin, sd->H, sd->W, O, K, (K - 1) / 2, sd->layer[j][2]))
                return 1;
            g = gx;
        }
        if (stream)
            for (int64_t q = 0; q < n * C * HW; q++) sd->gh[q] += g[q];
        return 0;
    }
    int64_t G = sd->G, cg = C / G, M = cg * HW;
    const float *gamma = sd->p[0];
    float *dgamma = sd->g[0], *dbeta = sd->g[1];
    memset(dgamma, 0, (size_t)C * sizeof(float));
    memset(dbeta, 0, (size_t)C * sizeof(float));
    for (int64_t i = 0; i < n; i++) {
        for (int64_t c = 0; c < C; c++) {
            int64_t o = (i * C + c) * HW;
            dgamma[c] += dot_f(sd->gs + o, sd->xhat + o, 0.0f, HW);
            dbeta[c] += sum_f(sd->gs + o, HW);
        }
        if (!stream) continue;
        for (int64_t gi = 0; gi < G; gi++) { /* GroupNorm: gh += rstd (gxh - mean(gxh) - xhat mean(gxh xhat)), gxh = gs gamma */
            int64_t o = (i * C + gi * cg) * HW;
            double m1 = 0.0, m2 = 0.0;
            for (int64_t c = 0; c < cg; c++) {
                float gc = gamma[gi * cg + c];
                m1 += gc * sum_f(sd->gs + o + c * HW, HW);
                m2 += gc * dot_f(sd->gs + o + c * HW, sd->xhat + o + c * HW, 0.0f, HW);
            }
            float mean1 = (float)(m1 / (double)M), mean2 = (float)(m2 / (double)M), rstd = sd->rstd[i * G + gi];
            for (int64_t c = 0; c < cg; c++) {
                float gc = gamma[gi * cg + c];
                for (int64_t q = c * HW; q < (c + 1) * HW; q++)
                    sd->gh[o + q] += rstd * (sd->gs[o + q] * gc - mean1 - sd->xhat[o + q] * mean2);
            }
        }
    }
    return 0;
}

enum { MAXL = 16 };

/* The maps of a host of L blocks (spec: per block O, K, padding, pool flag) on C0 x H0 x W0 inputs: block l takes
 * C[l] x H[l] x W[l], convolves to C[l + 1] x Ho[l] x Wo[l] and gives C[l + 1] x H[l + 1] x W[l + 1] (pooled or not).
 * Returns 0, or 2 for an unsupported kernel, an empty map or an odd map before a pool. */
static int host_geometry(int64_t C0, int64_t H0, int64_t W0, int64_t L, const int64_t *spec, int64_t *C, int64_t *H,
                         int64_t *W, int64_t *Ho, int64_t *Wo) {
    if (L < 1 || L > MAXL) return 2;
    C[0] = C0; H[0] = H0; W[0] = W0;
    for (int64_t l = 0; l < L; l++) {
        int64_t O = spec[4 * l], K = spec[4 * l + 1], pad = spec[4 * l + 2], pool = spec[4 * l + 3];
        if ((K != 1 && K != 3) || O < 1 || pad < 0) return 2;
        Ho[l] = H[l] + 2 * pad - K + 1;
        Wo[l] = W[l] + 2 * pad - K + 1;
        if (Ho[l] < 1 || Wo[l] < 1 || (pool && (Ho[l] % 2 || Wo[l] % 2))) return 2;
        C[l + 1] = O;
        H[l + 1] = pool ? Ho[l] / 2 : Ho[l];
        W[l + 1] = pool ? Wo[l] / 2 : Wo[l];
    }
    return 0;
}

/* A slot's seed from its SLOT_INTS integers (mode, style, body, groups or ATTENTION's mid, convolutions, the offset
 * of its tensors in the seed arrays, then per
 * convolution output channels, K, groups, ReLU) on an O x H x W map: its shapes and parameter sizes. Returns 0, or 2
 * for an inconsistent description. */
static int parse_seed(seed_t *sd, const int64_t *ss, int64_t O, int64_t H, int64_t W) {
    memset(sd, 0, sizeof *sd);
    sd->mode = ss[0];
    sd->style = ss[1];
    sd->body = ss[2];
    sd->G = ss[3];
    sd->n_layers = ss[4];
    if (sd->mode < SLOT_PASS || sd->mode > SLOT_FOSSIL) return 2;
    if (sd->mode == SLOT_PASS) return 0;
    if (sd->style < STYLE_ADD || sd->style > STYLE_GATED || sd->body < BODY_NORM || sd->body > BODY_ATTENTION) return 2;
    sd->C = O; sd->H = H; sd->W = W; sd->HW = H * W; sd->maxc = O;
    int64_t n_body;
    if (sd->body == BODY_NORM) {
        if (sd->G < 1 || O % sd->G) return 2;
        n_body = 2;
        sd->sizes[0] = sd->sizes[1] = O;
    } else if (sd->body == BODY_ATTENTION) {
        int64_t mid = sd->G;
        if (mid < 1 || mid > 64 || O > 64) return 2;
        n_body = 7;
        int64_t att_sizes[7] = {O, mid * O, mid, O * mid, O, 18, 1};
        for (int k = 0; k < 7; k++) sd->sizes[k] = att_sizes[k];
    } else {
        if (sd->n_layers < 1 || sd->n_layers > MAX_SEED_LAYERS) return 2;
        int64_t cin = O;
        for (int64_t j = 0; j < sd->n_layers; j++) {
            for (int k = 0; k < 4; k++) sd->layer[j][k] = ss[6 + 4 * j + k];
            int64_t lo = sd->layer[j][0], lk = sd->layer[j][1], lg = sd->layer[j][2];
            if ((lk != 1 && lk != 3) || lg < 1 || cin % lg || lo % lg || lo < 1) return 2;
            sd->sizes[2 * j] = lo * (cin / lg) * lk * lk;
            sd->sizes[2 * j + 1] = lo;
            if (lo > sd->maxc) sd->maxc = lo;
            cin = lo;
        }
        if (cin != O) return 2;
        n_body = 2 * sd->n_layers;
    }
    sd->sizes[n_body] = sd->sizes[n_body + 1] = O;
    sd->n_step = n_body + (sd->style == STYLE_GATED ? 2 : 0);
    return 0;
}

/* One epoch of minibatch Adam of the host: L blocks of convolution (bias, zero padding) + ReLU, block l followed
 * by a 2x2 max-pool when spec[4 l + 3], each block then its slot, then the mean-pool, linear classifier and
 * cross-entropy of head_loss_forward. x [N, C0, H0, W0] and y [N] are the epoch's images and labels in minibatch
 * order; minibatch b holds rows [b B, min(N, (b + 1) B)). spec[4 l .. 4 l + 3]: block l's output channels O,
 * kernel K, padding and pool flag.
 *
 * The host optimizer's n_host parameters (sizes[i] floats each) come first in the order conv weight and bias of
 * blocks 0..L-1, the head's weight [Kc, C] and bias [Kc], then any fossilized seed's. Slot l is described by
 * slot_spec[SLOT_INTS l ..] = (mode SLOT_*, style STYLE_*, body BODY_*, GroupNorm groups, convolutions, offset, then
 * (output channels, K, groups, ReLU) per convolution), slot_alpha[l], slot_lr[l] (its own Adam's learning rate
 * while it learns) and its pointers from the offset on in seed_params, seed_grads, seed_m, seed_v, seed_steps: the body's
 * parameters then the gate's (a fossil's point into the host's arrays). Per minibatch: forward, backward, each
 * fossil's gradient norm (before the host's clip), clip_adam of the host, then of each learning seed (its own
 * learning rate), all at max_norm.
 *
 * Without seeds the kernels run in the same order, on the same values, as the autograd path of the native kernels
 * (conv2d with fused ReLU and pool, head_loss, the backward of each, clip_adam): the same results bit for bit.
 * Outputs: losses [nb] (each minibatch's mean loss), norms [nb] (the host's gradient norm before clipping),
 * seed_norms [L, nb] (a fossil's or learning seed's), logits [N, Kc]; the gradients hold the last minibatch's
 * clipped gradients. Returns 0, 1 when out of memory, 2 for an unsupported kernel size, an odd map before a pool or
 * a bad slot, 3 for a label outside [0, Kc). */
int host_epoch(const float *restrict x, const int64_t *restrict y, int64_t N, int64_t B, int64_t C0, int64_t H0, int64_t W0,
               int64_t L, const int64_t *spec, int64_t Kc, int64_t n_host, const int64_t *sizes, float *const *params,
               float *const *grads, float *const *exp_avgs, float *const *exp_avg_sqs, float *const *steps,
               const int64_t *slot_spec, const double *slot_alpha, const double *slot_lr, float *const *seed_params,
               float *const *seed_grads, float *const *seed_m, float *const *seed_v, float *const *seed_steps,
               double lr, double beta1, double beta2, double eps, double max_norm,
               float *restrict losses, float *restrict norms, float *restrict seed_norms, float *restrict logits) {
    if (L < 1 || L > MAXL || B < 1 || N < 1 || n_host < 2 * L + 2) return 2;
    for (int64_t i = 0; i < N; i++)
        if (y[i] < 0 || y[i] >= Kc) return 3; /* before any update */
    int64_t C[MAXL + 1], H[MAXL + 1], W[MAXL + 1], Ho[MAXL], Wo[MAXL];
    int64_t size_in[MAXL + 1], size_conv[MAXL];
    seed_t seeds[MAXL];
    if (host_geometry(C0, H0, W0, L, spec, C, H, W, Ho, Wo)) return 2;
    int64_t total = 0;
    for (int64_t l = 0; l < L; l++) {
        size_conv[l] = B * C[l + 1] * Ho[l] * Wo[l];
        size_in[l + 1] = B * C[l + 1] * H[l + 1] * W[l + 1];
        /* conv output, pooled output, the gradient of the slot's output, the gradient of the conv output (pool) */
        total += 2 * size_conv[l] + 2 * size_in[l + 1];
        seed_t *sd = &seeds[l];
        if (parse_seed(sd, slot_spec + SLOT_INTS * l, C[l + 1], H[l + 1], W[l + 1])) return 2;
        if (sd->mode == SLOT_PASS) continue;
        sd->alpha = (float)slot_alpha[l];
        sd->lr = slot_lr[l];
        int64_t at = slot_spec[SLOT_INTS * l + 5];
        sd->p = seed_params + at; sd->g = seed_grads + at; sd->m = seed_m + at; sd->v = seed_v + at; sd->t = seed_steps + at;
        total += seed_buffers(sd, B, NULL);
    }
    int64_t CL = C[L], HWL = H[L] * W[L];
    total += B * CL + B * Kc + 1; /* hmean, probs, loss */
    float *buf = (float *)malloc((size_t)total * sizeof(float)); /* every buffer is written before it is read */
    int64_t idx_total = 0;
    for (int64_t l = 0; l < L; l++) idx_total += spec[4 * l + 3] ? size_in[l + 1] : 0;
    uint8_t *ibuf = (uint8_t *)malloc((size_t)(idx_total > 0 ? idx_total : 1));
    if (!buf || !ibuf) {
        free(buf);
        free(ibuf);
        return 1;
    }
    /* block l: conv_out[l] (after ReLU) -> block_out[l] (pooled) -> slot -> slot_out[l + 1], the next block's input */
    float *conv_out[MAXL], *block_out[MAXL], *slot_out[MAXL + 1], *grad_out[MAXL], *grad_block[MAXL], *grad_full[MAXL];
    uint8_t *pool_idx[MAXL];
    float *p = buf;
    uint8_t *q = ibuf;
    for (int64_t l = 0; l < L; l++) {
        int pool = (int)spec[4 * l + 3];
        seed_t *sd = &seeds[l];
        conv_out[l] = p; p += size_conv[l];
        block_out[l] = pool ? p : conv_out[l]; p += size_in[l + 1];
        grad_out[l] = p; p += size_in[l + 1];
        grad_full[l] = p; p += size_conv[l];
        pool_idx[l] = pool ? q : NULL; q += pool ? size_in[l + 1] : 0;
        slot_out[l + 1] = block_out[l];
        grad_block[l] = grad_out[l];
        if (sd->mode != SLOT_PASS) {
            p += seed_buffers(sd, B, p);
            if (sd->mode != SLOT_TRAINING) {
                slot_out[l + 1] = sd->z;
                grad_block[l] = sd->gh;
            }
        }
        if (!pool) grad_full[l] = grad_block[l];
    }
    float *hmean = p; p += B * CL;
    float *probs = p; p += B * Kc;
    float *loss = p; p += 1;
    (void)p;
    int64_t nb = (N + B - 1) / B;
    int rc = 0;
    for (int64_t b = 0; b < nb && !rc; b++) {
        int64_t start = b * B, n = N - start < B ? N - start : B;
        slot_out[0] = (float *)(x + start * C0 * H0 * W0);
        const int64_t *yb = y + start;
        for (int64_t l = 0; l < L && !rc; l++) {
            int64_t O = spec[4 * l], K = spec[4 * l + 1], pad = spec[4 * l + 2];
            rc = conv2d_forward(slot_out[l], params[2 * l], params[2 * l + 1], conv_out[l], n, C[l], H[l], W[l], O, K, pad, 1, 1);
            if (rc) break;
            if (spec[4 * l + 3]) maxpool2x2_forward(conv_out[l], block_out[l], pool_idx[l], n * O, Ho[l], Wo[l]);
            if (seeds[l].mode != SLOT_PASS) rc = seed_forward(&seeds[l], block_out[l], n);
        }
        if (rc) break;
        rc = head_loss_forward(slot_out[L], params[2 * L], params[2 * L + 1], yb, hmean, logits + start * Kc, probs, loss, n, CL, HWL, Kc);
        if (rc) break;
        losses[b] = *loss;
        rc = head_loss_backward(1.0f, probs, yb, hmean, params[2 * L], grad_out[L - 1], grads[2 * L], grads[2 * L + 1], n, CL, HWL, Kc);
        for (int64_t l = L - 1; l >= 0 && !rc; l--) {
            int64_t O = spec[4 * l], K = spec[4 * l + 1], pad = spec[4 * l + 2];
            if (seeds[l].mode != SLOT_PASS && (rc = seed_backward(&seeds[l], block_out[l], grad_out[l], n))) break;
            if (spec[4 * l + 3]) maxpool2x2_backward(grad_block[l], pool_idx[l], grad_full[l], n * O, Ho[l], Wo[l]);
            rc = conv2d_backward(slot_out[l], params[2 * l], grad_full[l], conv_out[l], l > 0 ? grad_out[l - 1] : NULL,
                                 grads[2 * l], grads[2 * l + 1], n, C[l], H[l], W[l], O, K, pad, 1);
        }
        if (rc) break;
        for (int64_t l = 0; l < L; l++)
            if (seeds[l].mode == SLOT_FOSSIL) seed_norms[l * nb + b] = grad_norm(seeds[l].n_step, seeds[l].g, seeds[l].sizes);
        clip_adam(n_host, params, grads, exp_avgs, exp_avg_sqs, steps, sizes, lr, beta1, beta2, eps, max_norm, norms + b);
        for (int64_t l = 0; l < L; l++) {
            seed_t *sd = &seeds[l];
            if (sd->mode == SLOT_TRAINING || sd->mode == SLOT_STREAM)
                clip_adam(sd->n_step, sd->p, sd->g, sd->m, sd->v, sd->t, sd->sizes, sd->lr, beta1, beta2, eps, max_norm,
                          seed_norms + l * nb + b);
        }
    }
    free(buf);
    free(ibuf);
    return rc;
}

/* A cache of maps for host_forward: (block, ablated slots so far) -> a map of N images. */
enum { MAX_MASKS = 64, CACHE_SIZE = 2 * MAXL * MAX_MASKS }; /* a mask adds at most a block pass and a slot output per block */

typedef struct {
    int64_t n, k[CACHE_SIZE], key[CACHE_SIZE];
    float *data[CACHE_SIZE];
} map_cache_t;

static float *cache_find(const map_cache_t *mc, int64_t k, int64_t key) {
    for (int64_t i = 0; i < mc->n; i++)
        if (mc->k[i] == k && mc->key[i] == key) return mc->data[i];
    return NULL;
}

static float *cache_add(map_cache_t *mc, int64_t k, int64_t key, int64_t floats) {
    if (mc->n >= CACHE_SIZE) return NULL;
    float *d = (float *)malloc((size_t)floats * sizeof(float));
    if (!d) return NULL;
    mc->k[mc->n] = k;
    mc->key[mc->n] = key;
    mc->data[mc->n++] = d;
    return d;
}

/* The host's logits on N images (no gradients), once per mask: masks[m] has bit l set when slot l is ablated (its
 * seed's output left out, as alpha 0). The slots are described as for host_epoch (a slot that is not SLOT_PASS puts
 * its seed in the stream at its alpha; while TRAINING a seed changes nothing without gradients: pass SLOT_PASS). A
 * block's pass or a slot's output that several masks share (the same ablated slots up to it) is computed once.
 * logits [n_masks, N, Kc]; y (valid labels) feeds the head kernel, whose loss is not used. Returns 0, 1 when out of
 * memory, 2 for a bad description. */
int host_forward(const float *restrict x, const int64_t *restrict y, int64_t N, int64_t C0, int64_t H0, int64_t W0, int64_t L,
                 const int64_t *spec, int64_t Kc, float *const *params, const int64_t *slot_spec, const double *slot_alpha,
                 float *const *seed_params, int64_t n_masks, const int64_t *masks, float *restrict logits) {
    int64_t C[MAXL + 1], H[MAXL + 1], W[MAXL + 1], Ho[MAXL], Wo[MAXL];
    seed_t seeds[MAXL];
    if (N < 1 || n_masks < 1 || n_masks > MAX_MASKS || host_geometry(C0, H0, W0, L, spec, C, H, W, Ho, Wo)) return 2;
    int64_t scratch = 0, total = 0;
    for (int64_t l = 0; l < L; l++) {
        seed_t *sd = &seeds[l];
        if (parse_seed(sd, slot_spec + SLOT_INTS * l, C[l + 1], H[l + 1], W[l + 1])) return 2;
        int64_t conv = N * C[l + 1] * Ho[l] * Wo[l];
        if (conv > scratch) scratch = conv;
        if (sd->mode == SLOT_PASS) continue;
        sd->mode = SLOT_STREAM;
        sd->alpha = (float)slot_alpha[l];
        sd->p = seed_params + slot_spec[SLOT_INTS * l + 5];
        total += seed_buffers(sd, N, NULL);
    }
    total += scratch + N * C[L] + 2 * N * Kc + 1; /* the conv output before a pool; hmean, probs, loss */
    float *buf = (float *)malloc((size_t)total * sizeof(float)); /* every buffer is written before it is read */
    uint8_t *idx = (uint8_t *)malloc((size_t)scratch);
    map_cache_t *mc = (map_cache_t *)calloc(1, sizeof(map_cache_t));
    int rc = !buf || !idx || !mc;
    float *p = buf;
    for (int64_t l = 0; l < L && !rc; l++)
        if (seeds[l].mode != SLOT_PASS) p += seed_buffers(&seeds[l], N, p);
    float *conv_scratch = p; p += scratch;
    float *hmean = p; p += N * C[L];
    float *probs = p; p += N * Kc;
    float *loss = p;
    for (int64_t m = 0; m < n_masks && !rc; m++) {
        const float *cur = x;
        for (int64_t l = 0; l < L && !rc; l++) {
            int64_t low = masks[m] & (((int64_t)1 << l) - 1), upto = masks[m] & (((int64_t)1 << (l + 1)) - 1);
            float *out = cache_find(mc, 2 * l + 1, upto);
            if (out) {
                cur = out;
                continue;
            }
            float *block = cache_find(mc, 2 * l, low);
            if (!block) {
                int64_t O = spec[4 * l], K = spec[4 * l + 1], pad = spec[4 * l + 2], pool = spec[4 * l + 3];
                block = cache_add(mc, 2 * l, low, N * C[l + 1] * H[l + 1] * W[l + 1]);
                if (!block) { rc = 1; break; }
                if (pool) {
                    rc = conv2d_forward(cur, params[2 * l], params[2 * l + 1], conv_scratch, N, C[l], H[l], W[l], O, K, pad, 1, 1);
                    if (!rc) maxpool2x2_forward(conv_scratch, block, idx, N * O, Ho[l], Wo[l]);
                } else {
                    rc = conv2d_forward(cur, params[2 * l], params[2 * l + 1], block, N, C[l], H[l], W[l], O, K, pad, 1, 1);
                }
                if (rc) break;
            }
            seed_t *sd = &seeds[l];
            if (sd->mode == SLOT_PASS || (masks[m] >> l) & 1) {
                cur = block;
                continue;
            }
            out = cache_add(mc, 2 * l + 1, upto, N * C[l + 1] * H[l + 1] * W[l + 1]);
            if (!out) { rc = 1; break; }
            sd->z = out;
            rc = seed_forward(sd, block, N);
            cur = out;
        }
        if (rc) break;
        rc = head_loss_forward(cur, params[2 * L], params[2 * L + 1], y, hmean, logits + m * N * Kc, probs, loss, N, C[L], H[L] * W[L], Kc);
        if (rc) rc = 2;
    }
    if (mc)
        for (int64_t i = 0; i < mc->n; i++) free(mc->data[i]);
    free(mc);
    free(buf);
    free(idx);
    return rc;
}
