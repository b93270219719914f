// onnxforge_run: load a TVM Relax module exported by onnxforge (`artifact.export("m.so")`),
// run its `main` function on inputs read from .npy files and write every output as .npy.
//
//   onnxforge_run MODEL.so OUT_DIR [--repeat N] IN0.npy [IN1.npy ...]
//
// Outputs are written as OUT_DIR/output_<i>.npy in the order the model returns them
// (a tuple is flattened depth-first). With --repeat N the function is run N times and
// the median wall time is printed as `median_ms <value>` (meaningless under qemu).
//
// Only the TVM runtime is needed on the board: libtvm_runtime.so and libtvm_ffi.so from
// the apache-tvm / apache-tvm-ffi wheels of the board's architecture. Cross-compile with
//   aarch64-linux-gnu-g++ -std=c++17 -O2 onnxforge_run.cc -I<tvm_ffi>/include
//       -L<libdir> -ltvm_runtime -ltvm_ffi -Wl,-rpath,'$ORIGIN' -o onnxforge_run
// (onnxforge.backends.tvm.build_aarch64_runner does exactly this).
#include <dlpack/dlpack.h>
#include <tvm/ffi/any.h>
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/shape.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace ffi = tvm::ffi;

namespace {

struct CPUAlloc {
  void AllocData(DLTensor* tensor) {
    size_t size = ffi::GetDataSize(*tensor);
    void* ptr = nullptr;
    if (posix_memalign(&ptr, 64, size == 0 ? 64 : size) != 0) throw std::bad_alloc();
    tensor->data = ptr;
  }
  void FreeData(DLTensor* tensor) { free(tensor->data); }
};

struct NpyDType {
  const char* descr;
  DLDataType dtype;
};

const NpyDType kDTypes[] = {
    {"<f4", {kDLFloat, 32, 1}}, {"<f8", {kDLFloat, 64, 1}}, {"<f2", {kDLFloat, 16, 1}},
    {"<i8", {kDLInt, 64, 1}},   {"<i4", {kDLInt, 32, 1}},   {"<i2", {kDLInt, 16, 1}},
    {"|i1", {kDLInt, 8, 1}},    {"|u1", {kDLUInt, 8, 1}},   {"<u2", {kDLUInt, 16, 1}},
    {"<u4", {kDLUInt, 32, 1}},  {"<u8", {kDLUInt, 64, 1}},  {"|b1", {kDLBool, 8, 1}},
};

bool SameDType(const DLDataType& a, const DLDataType& b) {
  return a.code == b.code && a.bits == b.bits && a.lanes == b.lanes;
}

std::string HeaderValue(const std::string& header, const std::string& key) {
  size_t pos = header.find("'" + key + "'");
  if (pos == std::string::npos) throw std::runtime_error("npy header lacks " + key);
  pos = header.find(':', pos);
  size_t start = header.find_first_not_of(' ', pos + 1);
  if (header[start] == '(') return header.substr(start, header.find(')', start) - start + 1);
  if (header[start] == '\'') return header.substr(start + 1, header.find('\'', start + 1) - start - 1);
  size_t end = header.find_first_of(",}", start);
  return header.substr(start, end - start);
}

ffi::Tensor ReadNpy(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot open " + path);
  char magic[6];
  in.read(magic, 6);
  if (std::memcmp(magic, "\x93NUMPY", 6) != 0) throw std::runtime_error(path + " is not .npy");
  unsigned char version[2];
  in.read(reinterpret_cast<char*>(version), 2);
  uint32_t header_len = 0;
  if (version[0] == 1) {
    unsigned char len[2];
    in.read(reinterpret_cast<char*>(len), 2);
    header_len = len[0] | (len[1] << 8);
  } else {
    unsigned char len[4];
    in.read(reinterpret_cast<char*>(len), 4);
    header_len = len[0] | (len[1] << 8) | (len[2] << 16) | (static_cast<uint32_t>(len[3]) << 24);
  }
  std::string header(header_len, '\0');
  in.read(header.data(), header_len);
  if (HeaderValue(header, "fortran_order") != "False") {
    throw std::runtime_error(path + ": Fortran-order arrays are not supported");
  }
  std::string descr = HeaderValue(header, "descr");
  const NpyDType* found = nullptr;
  for (const auto& d : kDTypes) {
    if (descr == d.descr) found = &d;
  }
  if (found == nullptr) throw std::runtime_error(path + ": unsupported dtype " + descr);
  std::string shape_text = HeaderValue(header, "shape");
  std::vector<int64_t> shape;
  std::stringstream ss(shape_text.substr(1, shape_text.size() - 2));
  std::string item;
  while (std::getline(ss, item, ',')) {
    if (item.find_first_not_of(' ') != std::string::npos) shape.push_back(std::stoll(item));
  }
  ffi::Tensor tensor =
      ffi::Tensor::FromNDAlloc(CPUAlloc(), ffi::Shape(shape), found->dtype, DLDevice{kDLCPU, 0});
  size_t nbytes = ffi::GetDataSize(*tensor.GetDLTensorPtr());
  in.read(static_cast<char*>(tensor.data_ptr()), static_cast<std::streamsize>(nbytes));
  if (static_cast<size_t>(in.gcount()) != nbytes) throw std::runtime_error(path + " is truncated");
  return tensor;
}

void WriteNpy(const std::string& path, const DLTensor* tensor) {
  if (tensor->device.device_type != kDLCPU) throw std::runtime_error("output is not on the CPU");
  const NpyDType* found = nullptr;
  for (const auto& d : kDTypes) {
    if (SameDType(d.dtype, tensor->dtype)) found = &d;
  }
  if (found == nullptr) throw std::runtime_error("unsupported output dtype");
  std::string shape = "(";
  for (int i = 0; i < tensor->ndim; ++i) {
    shape += std::to_string(tensor->shape[i]) + (tensor->ndim == 1 ? "," : (i + 1 < tensor->ndim ? ", " : ""));
  }
  shape += ")";
  std::string header = "{'descr': '" + std::string(found->descr) +
                       "', 'fortran_order': False, 'shape': " + shape + ", }";
  size_t total = 10 + header.size() + 1;
  header.append((64 - total % 64) % 64, ' ');
  header.push_back('\n');
  std::string tmp = path + ".tmp";
  std::ofstream out(tmp, std::ios::binary);
  out.write("\x93NUMPY\x01\x00", 8);
  unsigned char len[2] = {static_cast<unsigned char>(header.size() & 0xff),
                          static_cast<unsigned char>(header.size() >> 8)};
  out.write(reinterpret_cast<char*>(len), 2);
  out.write(header.data(), static_cast<std::streamsize>(header.size()));
  // Outputs of the VM are compact row-major tensors; copy element bytes as they are.
  out.write(static_cast<const char*>(tensor->data) + tensor->byte_offset,
            static_cast<std::streamsize>(ffi::GetDataSize(*tensor)));
  out.close();
  if (!out) throw std::runtime_error("cannot write " + tmp);
  if (std::rename(tmp.c_str(), path.c_str()) != 0) throw std::runtime_error("cannot write " + path);
}

void Flatten(const ffi::Any& value, std::vector<ffi::Tensor>* outputs) {
  if (auto tensor = value.try_cast<ffi::Tensor>()) {
    outputs->push_back(*tensor);
  } else if (auto shape = value.as<ffi::Shape>()) {
    // an ONNX Shape output: one int64 tensor
    std::vector<int64_t> dims = {static_cast<int64_t>(shape->size())};
    ffi::Tensor out = ffi::Tensor::FromNDAlloc(CPUAlloc(), ffi::Shape(dims),
                                               DLDataType{kDLInt, 64, 1}, DLDevice{kDLCPU, 0});
    std::copy(shape->begin(), shape->end(), static_cast<int64_t*>(out.data_ptr()));
    outputs->push_back(out);
  } else if (auto array = value.try_cast<ffi::Array<ffi::Any>>()) {
    for (const ffi::Any& item : *array) Flatten(item, outputs);
  } else {
    throw std::runtime_error("unsupported output type " + value.GetTypeKey());
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    std::cerr << "usage: " << argv[0] << " MODEL.so OUT_DIR [--repeat N] IN0.npy [IN1.npy ...]\n";
    return 2;
  }
  try {
    std::string model_path = argv[1];
    std::string out_dir = argv[2];
    int repeat = 0;
    std::vector<std::string> input_paths;
    for (int i = 3; i < argc; ++i) {
      if (std::string(argv[i]) == "--repeat" && i + 1 < argc) {
        repeat = std::atoi(argv[++i]);
      } else {
        input_paths.push_back(argv[i]);
      }
    }
    ffi::Module lib = ffi::Module::LoadFromFile(model_path);
    ffi::Module vm = lib->GetFunction("vm_load_executable").value()().cast<ffi::Module>();
    constexpr int kPooledAllocator = 2;
    vm->GetFunction("vm_initialization").value()(static_cast<int>(kDLCPU), 0, kPooledAllocator);
    ffi::Function main_fn = vm->GetFunction("main").value();

    std::vector<ffi::Tensor> inputs;
    for (const std::string& path : input_paths) inputs.push_back(ReadNpy(path));
    std::vector<ffi::AnyView> args(inputs.begin(), inputs.end());
    ffi::Any result;
    main_fn.CallPacked(args.data(), static_cast<int32_t>(args.size()), &result);

    if (repeat > 0) {
      std::vector<double> samples;
      for (int i = 0; i < repeat; ++i) {
        auto start = std::chrono::steady_clock::now();
        ffi::Any again;
        main_fn.CallPacked(args.data(), static_cast<int32_t>(args.size()), &again);
        samples.push_back(
            std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start)
                .count());
      }
      std::sort(samples.begin(), samples.end());
      std::cout << "median_ms " << samples[samples.size() / 2] << "\n";
    }

    std::vector<ffi::Tensor> outputs;
    Flatten(result, &outputs);
    for (size_t i = 0; i < outputs.size(); ++i) {
      WriteNpy(out_dir + "/output_" + std::to_string(i) + ".npy", outputs[i].GetDLTensorPtr());
    }
    std::cout << "outputs " << outputs.size() << "\n";
  } catch (const ffi::Error& err) {
    std::cerr << "onnxforge_run: " << err.what() << "\n";
    return 1;
  } catch (const std::exception& err) {
    std::cerr << "onnxforge_run: " << err.what() << "\n";
    return 1;
  }
  return 0;
}
