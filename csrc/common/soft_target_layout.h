// Layout shared by the CPU and CUDA epilogues of the chunked soft-target loss and by their Python driver
// (kc_kernels/layout.py, docs/epilogue.md): phase bits, rows of the state array, planes of the per-(row, segment)
// constants and the kinds of self-paced scale. The bindings export these enums with the names below, so the
// driver can check that its own constants agree with the compiled ones.
#pragma once

namespace kc {

// Phases of one epilogue call, as a bitmask; a call runs its phases in this order per row and piece.
enum Phase {
  kPhaseTeacher = 1,  // dense softmax targets: the teacher's log-sum-exp (TMAX, TSUMEXP)
  kPhaseNorm = 2,     // the self-paced norm (SUMSQ)
  kPhaseStats = 4,    // statistics that need the norm and the teacher's log-sum-exp
  kPhaseFinal = 8,    // loss sums and, with a gradient coefficient, the logit gradient in place
};
constexpr int kNumPhases = 4;
static_assert(kPhaseFinal == 1 << (kNumPhases - 1), "phase i is bit i: the bindings export them so");
constexpr const char* kPhaseNames[kNumPhases] = {"TEACHER", "NORM", "STATS", "FINAL"};

// Rows of the [kNumStates, B, G] state array (sums over the classes j of a segment; "u/(nT)" reads "u/T"
// without a scale).
enum State {
  kSumSq = 0,      // sum u^2 (self-paced norm)
  kMax,            // softmax: running max of y
  kSumExp,         // softmax: sum exp(y - MAX)
  kSumExpU,        // softmax: sum exp(y - MAX) u/(nT)  | sigmoid: sum sigmoid(y) u/(nT)
  kSumExpY,        // softmax: sum exp(y - MAX) yh      | sigmoid: sum sigmoid(y) yh   (yh = s u/(nT), no bias)
  kZSum,           // target mass m = sum z
  kZY,             // sum z y
  kZU,             // sum z u/(nT)
  kZYScaled,       // sum z yh (feeds the norm's gradient term S)
  kTeacherMax,     // dense softmax targets: running max of t/T
  kTeacherSumExp,  // and sum exp(t/T - TMAX)
  kR,              // sum q u/(nT): a per-segment scale's gradient per row
  kS,              // sum q yh: the norm's gradient term per row
  kNumStates
};
constexpr const char* kStateNames[kNumStates] = {"SUMSQ", "MAX",  "SUMEXP", "SUMEXP_U", "SUMEXP_Y", "ZSUM", "ZY",
                                                 "ZU",    "ZYH",  "TMAX",   "TSUMEXP",  "R",        "S"};

// Planes of the [kNumConsts, B, G] constants the driver derives from the states before a GPU FINAL.
enum Const {
  kConstInvNT = 0,  // 1/(nT), or 1/T without a scale
  kConstLse,        // softmax: log-sum-exp of y over the segment
  kConstMass,       // softmax: target mass m
  kConstTeacherLse, // dense softmax targets: TMAX + log TSUMEXP
  kConstSN2,        // S / n^2 (0 without a scale)
  kNumConsts
};
constexpr const char* kConstNames[kNumConsts] = {"INV_NT", "LSE", "MASS", "TLSE", "S_N2"};

// How the self-paced scale s is indexed: none, one per segment, one per class.
enum ScaleKind { kScaleNone = 0, kScaleSegment = 1, kScaleClass = 2 };
constexpr int kNumScaleKinds = 3;
constexpr const char* kScaleKindNames[kNumScaleKinds] = {"NONE", "SEGMENT", "CLASS"};

}  // namespace kc
