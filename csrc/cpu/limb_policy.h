// Whether the int4 limb GEMVs may split activation chunks into two limbs (limb_layout.h:
// keeps_two_limbs) or must keep three. Two limbs hold every dot product within half the fp32
// worst-case bound but carry ~16 bits of each activation instead of ~21, so their typical error
// is above fp32 rounding; three limbs reproduce a float model to fp32 rounding. Default: two
// where allowed, unless CODEGEN_Q_ACTIVATION_LIMBS=3. Compiled once, shared by every ISA.
#pragma once

namespace cgq::cpu {

bool two_limbs_allowed();
void set_two_limbs_allowed(bool allowed);

}  // namespace cgq::cpu
