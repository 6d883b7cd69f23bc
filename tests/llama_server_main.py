"""`python -m llama_cpp.server`, with llama.cpp's extra CPU buffer types off (the tests' judge server).

Why: a llama.cpp wheel built on a CPU that advertises AMX runs its matrix products
through AMX tiles (an "extra buffer type"), and on some virtual machines those
instructions fault: seen here on a Xeon VM whose /proc/cpuinfo lists amx_tile, where
the server died with SIGILL inside ggml_backend_amx_mul_mat at the first chat request.
`use_extra_bufts = False` (llama.cpp's `--no-repack`, which llama-cpp-python's server
does not expose) keeps every weight in the plain CPU buffer, whatever flags the wheel
was built with and whatever CPU runs it; the server is otherwise the stock one.

    python tests/llama_server_main.py --model F --host 127.0.0.1 --port P [other llama_cpp.server flags]
"""

import sys

import llama_cpp.llama_cpp as llama_cpp_lib

_default_params = llama_cpp_lib.llama_model_default_params


def _params_without_extra_buffers():
    params = _default_params()
    params.use_extra_bufts = False
    return params


llama_cpp_lib.llama_model_default_params = _params_without_extra_buffers

if __name__ == "__main__":
    from llama_cpp.server.__main__ import main

    sys.argv[0] = "llama_cpp.server"
    main()
