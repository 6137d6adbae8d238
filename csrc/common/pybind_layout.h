// Exports the soft-target layout and loss-mode enums (soft_target_layout.h, soft_target_math.h) into a pybind11
// module as {name: value} dicts made from the same X-macro lists as the enums, so the Python driver can check that
// its IntEnums agree with the compiled ones. Included by both bindings.
#pragma once
#include <pybind11/pybind11.h>

#include "common/soft_target_layout.h"
#include "common/soft_target_math.h"

namespace kc {

// {name: value} for an enum whose i-th name has the value value_of(i) (for enums outside these lists).
template <typename ValueOf>
pybind11::dict enum_dict(const char* const* names, int count, ValueOf value_of) {
  pybind11::dict d;
  for (int i = 0; i < count; ++i) d[names[i]] = value_of(i);
  return d;
}

#define KC_EXPORT_ITEM(name, py, ...) d[py] = static_cast<int>(name);

inline void export_soft_target_layout(pybind11::module_& m) {
  m.attr("NUM_STATES") = static_cast<int>(kNumStates);
  m.attr("NUM_CONSTS") = static_cast<int>(kNumConsts);
  m.attr("NORM_EPS") = kNormEps;
  pybind11::dict d;
  KC_STATES(KC_EXPORT_ITEM)
  m.attr("STATES") = d;
  d = pybind11::dict();
  KC_CONSTS(KC_EXPORT_ITEM)
  m.attr("CONSTS") = d;
  d = pybind11::dict();
  KC_PHASES(KC_EXPORT_ITEM)
  m.attr("PHASES") = d;
  d = pybind11::dict();
  KC_SCALE_KINDS(KC_EXPORT_ITEM)
  m.attr("SCALE_KINDS") = d;
  d = pybind11::dict();
  KC_LOSS_MODES(KC_EXPORT_ITEM)
  m.attr("LOSS_MODES") = d;
}

#undef KC_EXPORT_ITEM

}  // namespace kc
