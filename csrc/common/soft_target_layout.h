// Layout shared by the CPU and CUDA epilogues of the chunked soft-target loss and by their Python driver
// (kc_kernels/layout.py, docs/epilogue.md): phase bits, rows of the state array, planes of the per-(row, segment)
// constants and the kinds of self-paced scale. Each enum is one X-macro list (name in C++, name exported to
// Python, meaning), from which both the enum and the names the bindings export are made (pybind_layout.h), so the
// driver can check that its IntEnums agree with the compiled ones.
#pragma once

namespace kc {

#define KC_ENUM_ITEM(name, py, ...) name,
#define KC_ENUM_NAME(name, py, ...) py,

// Phases of one epilogue call, as a bitmask (phase i is bit i). A call runs them per row and piece in the order
// TEACHER, NORM, STATS, MIX, FINAL (MIX came last to the list, so FINAL kept its bit).
#define KC_PHASES(X)                                                                    \
  X(kPhaseTeacher, "TEACHER") /* dense softmax targets: the teacher's log-sum-exp */    \
  X(kPhaseNorm, "NORM")       /* the self-paced norm (SUMSQ) */                         \
  X(kPhaseStats, "STATS")     /* statistics that need the norm and the teacher's lse */ \
  X(kPhaseFinal, "FINAL")     /* loss sums and, with a coefficient, the logit gradient */  \
  X(kPhaseMix, "MIX")         /* JSD: sums over the mixture, run after STATS and before FINAL */
namespace phase_index {
enum { KC_PHASES(KC_ENUM_ITEM) kCount };
}
#define KC_PHASE_BIT(name, py, ...) name = 1 << phase_index::name,
enum Phase { KC_PHASES(KC_PHASE_BIT) };
constexpr int kNumPhases = phase_index::kCount;
constexpr const char* kPhaseNames[kNumPhases] = {KC_PHASES(KC_ENUM_NAME)};

// Rows of the [kNumStates, B, G] state array (sums over the classes j of a segment; "u/(nT)" reads "u/T"
// without a scale; yh = s u/(nT), no bias).
#define KC_STATES(X)                                                                              \
  X(kSumSq, "SUMSQ")            /* sum u^2 (self-paced norm) */                                   \
  X(kMax, "MAX")                /* softmax: running max of y */                                   \
  X(kSumExp, "SUMEXP")          /* softmax: sum exp(y - MAX) */                                   \
  X(kSumExpU, "SUMEXP_U")       /* softmax: sum exp(y - MAX) u/(nT) | sigmoid: sum sigmoid(y) u/(nT) */ \
  X(kSumExpY, "SUMEXP_Y")       /* softmax: sum exp(y - MAX) yh     | sigmoid: sum sigmoid(y) yh */ \
  X(kZSum, "ZSUM")              /* target mass m = sum z */                                       \
  X(kZY, "ZY")                  /* sum z y */                                                     \
  X(kZU, "ZU")                  /* sum z u/(nT) */                                                \
  X(kZYScaled, "ZYH")           /* sum z yh (feeds the norm's gradient term S) */                 \
  X(kTeacherMax, "TMAX")        /* dense softmax targets: running max of t/T */                   \
  X(kTeacherSumExp, "TSUMEXP")  /* and sum exp(t/T - TMAX) */                                     \
  X(kR, "R")                    /* sum q u/(nT): a per-segment scale's gradient per row */        \
  X(kS, "S")                    /* sum q yh: the norm's gradient term per row */                  \
  X(kTeacherEnt, "TENT")        /* dense teacher: sum exp(t/T - TMAX) t/T (the teacher's entropy) */ \
  X(kDiv, "DIV")                /* reverse KL: sum exp(y - MAX) (y - t/T) | JSD: sum p log(p/M) */ \
  X(kDivLoss, "DLOSS")          /* JSD: the divergence summed over the segment (MIX) */
enum State { KC_STATES(KC_ENUM_ITEM) kNumStates };
constexpr const char* kStateNames[kNumStates] = {KC_STATES(KC_ENUM_NAME)};

// Planes of the [kNumConsts, B, G] constants the driver derives from the states before a GPU FINAL.
#define KC_CONSTS(X)                                                        \
  X(kConstInvNT, "INV_NT")      /* 1/(nT), or 1/T without a scale */        \
  X(kConstLse, "LSE")           /* softmax: log-sum-exp of y over the segment */ \
  X(kConstMass, "MASS")         /* softmax: target mass m */                \
  X(kConstTeacherLse, "TLSE")   /* dense softmax targets: TMAX + log TSUMEXP */ \
  X(kConstSN2, "S_N2")          /* S / n^2 (0 without a scale) */           \
  X(kConstDbar, "DBAR")         /* reverse KL: DIV / SUMEXP | JSD: DIV */
enum Const { KC_CONSTS(KC_ENUM_ITEM) kNumConsts };
constexpr const char* kConstNames[kNumConsts] = {KC_CONSTS(KC_ENUM_NAME)};

// How the self-paced scale s is indexed: none, one per segment, one per class.
#define KC_SCALE_KINDS(X) X(kScaleNone, "NONE") X(kScaleSegment, "SEGMENT") X(kScaleClass, "CLASS")
enum ScaleKind { KC_SCALE_KINDS(KC_ENUM_ITEM) kNumScaleKinds };
constexpr const char* kScaleKindNames[kNumScaleKinds] = {KC_SCALE_KINDS(KC_ENUM_NAME)};

}  // namespace kc
