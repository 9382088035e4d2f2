# Not used by the build: cmake-js builds the addon from CMakeLists.txt, because llama.cpp
# itself is a CMake project. This file only describes the addon's sources and include paths
# for tools that expect a binding.gyp (editors, `node-gyp configure` for a compile database).
{
  "targets": [
    {
      "target_name": "caprl_engine",
      "sources": [
        "native/addon-vision.cpp",
        "native/addon.cpp",
        "native/engine.cpp",
        "native/kv-plan.cpp",
        "native/qwen-vision-encoder.cpp",
        "native/sampler.cpp",
        "native/text-stream.cpp",
        "native/vision-worker.cpp"
      ],
      "include_dirs": [
        "<!@(node -p \"require('node-addon-api').include\")",
        "deps/llama.cpp/include",
        "deps/llama.cpp/ggml/include",
        "deps/llama.cpp/common",
        "deps/llama.cpp/tools/mtmd",
        "deps/llama.cpp/src",
        "kernels"
      ],
      "defines": ["NAPI_VERSION=8", "NODE_ADDON_API_CPP_EXCEPTIONS"],
      "cflags_cc": ["-std=c++17", "-fexceptions"]
    }
  ]
}
