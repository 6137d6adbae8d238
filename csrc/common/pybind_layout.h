// Exports the soft-target layout and loss-mode enums (soft_target_layout.h, soft_target_math.h) into a pybind11
// module as {name: value} dicts made from the same X-macro lists as the enums, so the Python driver can check that
// its IntEnums agree with the compiled ones. Included by both bindings.
#pragma once
#include <pybind11/pybind11.h>

#include "common/soft_target_layout.h"
#include "common/soft_target_math.h"

namespace kc {

// Sets m.<attr> to {python name: value} of an X-macro list LIST(X), X(name, python name, ...).
#define KC_EXPORT_ITEM(name, py, ...) d[py] = static_cast<int>(name);
#define KC_EXPORT_ENUM(m, py_name, LIST) \
  do {                                \
    pybind11::dict d;                 \
    LIST(KC_EXPORT_ITEM)              \
    (m).attr(py_name) = d;            \
  } while (0)

inline void export_soft_target_layout(pybind11::module_& m) {
  m.attr("NUM_STATES") = static_cast<int>(kNumStates);
  m.attr("NUM_CONSTS") = static_cast<int>(kNumConsts);
  m.attr("NORM_EPS") = kNormEps;
  KC_EXPORT_ENUM(m, "STATES", KC_STATES);
  KC_EXPORT_ENUM(m, "CONSTS", KC_CONSTS);
  KC_EXPORT_ENUM(m, "PHASES", KC_PHASES);
  KC_EXPORT_ENUM(m, "SCALE_KINDS", KC_SCALE_KINDS);
  KC_EXPORT_ENUM(m, "LOSS_MODES", KC_LOSS_MODES);
}

}  // namespace kc
