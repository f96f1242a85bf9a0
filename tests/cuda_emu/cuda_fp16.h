// CPU stand-in for <cuda_fp16.h> (see cuda_emu.h): IEEE half through the compiler's _Float16,
// whose conversion from float rounds to nearest even, as __float2half_rn does.
#pragma once

struct __half {
  _Float16 value;
};

inline float __half2float(__half v) { return (float)v.value; }
inline __half __float2half_rn(float f) { return __half{(_Float16)f}; }
