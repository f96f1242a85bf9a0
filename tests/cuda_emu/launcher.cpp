// Runs one kernel of src/cuda/ on the CPU (see cuda_emu.h), for tests/cuda_kernels_emulated.rs:
//
//   cuda-emu KERNEL GRID_X BLOCK_X BLOCK_Y ARG...
//
// An ARG is in:PATH (a device buffer holding the file's bytes, followed by NaN bytes so that a
// read past the end shows in the output), out:PATH:BYTES (a buffer of BYTES, filled with 0xff
// so that an element the kernel never writes reads as NaN, written to PATH after the launch;
// canary bytes after it catch a write past the end), inout:PATH (a buffer holding the file's
// bytes, updated in place and written back to PATH, with canary bytes after it), or i32:V,
// i64:V, u64:V, f32:V (an int, int64_t, size_t or float parameter). The
// tags are checked against the kernel's signature, so an argument pushed in the wrong order or
// type fails here as it would corrupt the launch on a GPU.
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <iterator>
#include <map>
#include <string>
#include <tuple>
#include <utility>

#include "../../src/cuda/adamw.cu"
#include "../../src/cuda/attention.cu"
#include "../../src/cuda/nll.cu"
#include "../../src/cuda/rms_norm.cu"
#include "../../src/cuda/rope.cu"
#include "../../src/cuda/softcap.cu"
#include "../../src/cuda/swiglu.cu"

namespace {

[[noreturn]] void die(const std::string& msg) {
  std::fprintf(stderr, "cuda-emu: %s\n", msg.c_str());
  std::exit(2);
}

// bytes after each buffer: NaN (0xff) after inputs, a canary after outputs
constexpr size_t GUARD = 64;
constexpr unsigned char CANARY = 0xa5;

struct Arg {
  enum Kind { Buffer, I32, I64, U64, F32 } kind;
  std::vector<unsigned char> bytes;  // Buffer, GUARD bytes longer than its contents
  std::string out_path;              // Buffer written back after the launch, if set
  int64_t value = 0;                 // I32, I64, U64
  float real = 0.0f;                 // F32
};

template <typename P>
struct Take;
template <typename T>
struct Take<T*> {
  static T* get(Arg& a, size_t i) {
    if (a.kind != Arg::Buffer) die("argument " + std::to_string(i) + " must be a buffer");
    return reinterpret_cast<T*>(a.bytes.data());
  }
};
template <>
struct Take<int> {
  static int get(Arg& a, size_t i) {
    if (a.kind != Arg::I32) die("argument " + std::to_string(i) + " must be i32");
    return (int)a.value;
  }
};
template <>
struct Take<int64_t> {
  static int64_t get(Arg& a, size_t i) {
    if (a.kind != Arg::I64) die("argument " + std::to_string(i) + " must be i64");
    return a.value;
  }
};
template <>
struct Take<size_t> {
  static size_t get(Arg& a, size_t i) {
    if (a.kind != Arg::U64) die("argument " + std::to_string(i) + " must be u64");
    return (size_t)a.value;
  }
};

template <>
struct Take<float> {
  static float get(Arg& a, size_t i) {
    if (a.kind != Arg::F32) die("argument " + std::to_string(i) + " must be f32");
    return a.real;
  }
};

using Launcher = std::function<void(dim3, dim3, std::vector<Arg>&)>;

template <typename... P, size_t... I>
std::tuple<P...> take_all(std::vector<Arg>& args, std::index_sequence<I...>) {
  return std::tuple<P...>{Take<P>::get(args[I], I)...};
}

template <typename... P>
Launcher wrap(void (*kernel)(P...)) {
  return [kernel](dim3 grid, dim3 block, std::vector<Arg>& args) {
    if (args.size() != sizeof...(P)) {
      die("the kernel takes " + std::to_string(sizeof...(P)) + " arguments, not " +
          std::to_string(args.size()));
    }
    auto params = take_all<P...>(args, std::index_sequence_for<P...>{});
    cuda_emu::launch(grid, block, [&] { std::apply(kernel, params); });
  };
}

#define FOR_DTYPES(NAME) \
  {#NAME "_f32", wrap(NAME##_f32)}, {#NAME "_bf16", wrap(NAME##_bf16)}, {#NAME "_f16", wrap(NAME##_f16)}

const std::map<std::string, Launcher>& kernels() {
  static const std::map<std::string, Launcher> table = {
      FOR_DTYPES(masked_softmax), FOR_DTYPES(masked_softmax_bwd), FOR_DTYPES(nll_fwd),
      FOR_DTYPES(nll_bwd),        FOR_DTYPES(rope),               FOR_DTYPES(swiglu),
      FOR_DTYPES(swiglu_gate_grad), FOR_DTYPES(swiglu_up_grad), FOR_DTYPES(rms_norm),
      FOR_DTYPES(rms_norm_bwd), FOR_DTYPES(swiglu_packed), FOR_DTYPES(swiglu_packed_bwd),
      FOR_DTYPES(softcap), FOR_DTYPES(softcap_grad),
      {"adamw_moments_f32", wrap(adamw_moments_f32)}, {"adamw_param_f32", wrap(adamw_param_f32)},
  };
  return table;
}

Arg parse(const std::string& s) {
  auto colon = s.find(':');
  if (colon == std::string::npos) die("bad argument '" + s + "'");
  std::string tag = s.substr(0, colon), rest = s.substr(colon + 1);
  Arg a{};
  if (tag == "in") {
    a.kind = Arg::Buffer;
    std::ifstream f(rest, std::ios::binary);
    if (!f) die("cannot read " + rest);
    a.bytes.assign(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
    a.bytes.insert(a.bytes.end(), GUARD, 0xff);
  } else if (tag == "inout") {
    a.kind = Arg::Buffer;
    a.out_path = rest;
    std::ifstream f(rest, std::ios::binary);
    if (!f) die("cannot read " + rest);
    a.bytes.assign(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
    a.bytes.insert(a.bytes.end(), GUARD, CANARY);
  } else if (tag == "out") {
    auto sep = rest.rfind(':');
    if (sep == std::string::npos) die("out: needs PATH:BYTES, got '" + rest + "'");
    a.kind = Arg::Buffer;
    a.out_path = rest.substr(0, sep);
    a.bytes.assign(std::stoull(rest.substr(sep + 1)), 0xff);
    a.bytes.insert(a.bytes.end(), GUARD, CANARY);
  } else if (tag == "i32" || tag == "i64" || tag == "u64") {
    a.kind = tag == "i32" ? Arg::I32 : tag == "i64" ? Arg::I64 : Arg::U64;
    a.value = std::stoll(rest);
  } else if (tag == "f32") {
    a.kind = Arg::F32;
    a.real = std::stof(rest);
  } else {
    die("unknown argument tag '" + tag + "'");
  }
  return a;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 5) die("usage: cuda-emu KERNEL GRID_X BLOCK_X BLOCK_Y ARG...");
  auto it = kernels().find(argv[1]);
  if (it == kernels().end()) die(std::string("no kernel ") + argv[1]);
  dim3 grid{(unsigned)std::stoul(argv[2]), 1, 1};
  dim3 block{(unsigned)std::stoul(argv[3]), (unsigned)std::stoul(argv[4]), 1};
  std::vector<Arg> args;
  for (int i = 5; i < argc; ++i) args.push_back(parse(argv[i]));
  it->second(grid, block, args);
  for (const Arg& a : args) {
    if (a.out_path.empty()) continue;
    size_t size = a.bytes.size() - GUARD;
    for (size_t i = size; i < a.bytes.size(); ++i) {
      if (a.bytes[i] != CANARY) die("the kernel wrote past the end of " + a.out_path);
    }
    std::ofstream f(a.out_path, std::ios::binary);
    f.write(reinterpret_cast<const char*>(a.bytes.data()), (std::streamsize)size);
    if (!f) die("cannot write " + a.out_path);
  }
  return 0;
}
