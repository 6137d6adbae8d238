// Exports the soft-target layout enums (soft_target_layout.h) into a pybind11 module as {name: value} dicts, so
// the Python driver can check that its constants agree with the compiled ones. Included by both bindings.
#pragma once
#include <pybind11/pybind11.h>

#include "common/soft_target_layout.h"

namespace kc {

// {name: value} for an enum whose i-th name has the value value_of(i).
template <typename ValueOf>
pybind11::dict enum_dict(const char* const* names, int count, ValueOf value_of) {
  pybind11::dict d;
  for (int i = 0; i < count; ++i) d[names[i]] = value_of(i);
  return d;
}

inline void export_soft_target_layout(pybind11::module_& m) {
  auto index = [](int i) { return i; };
  m.attr("NUM_STATES") = static_cast<int>(kNumStates);
  m.attr("NUM_CONSTS") = static_cast<int>(kNumConsts);
  m.attr("STATES") = enum_dict(kStateNames, kNumStates, index);
  m.attr("CONSTS") = enum_dict(kConstNames, kNumConsts, index);
  m.attr("PHASES") = enum_dict(kPhaseNames, kNumPhases, [](int i) { return 1 << i; });
  m.attr("SCALE_KINDS") = enum_dict(kScaleKindNames, kNumScaleKinds, index);
}

}  // namespace kc
