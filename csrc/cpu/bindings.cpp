// grm_engine._C: pybind11 bindings for the CPU kernels (no torch dependency, so it builds everywhere).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <thread>
#include <vector>

#include "score_parser.h"

namespace py = pybind11;

namespace {

// Below this many texts a second thread costs more than it saves.
constexpr size_t kMinTextsPerThread = 2048;

py::tuple parse_scores(py::list texts, py::array_t<int64_t, py::array::c_style | py::array::forcecast> counts,
                       int64_t n_max, double lo, double hi, int num_threads) {
  const size_t n = texts.size();
  if (static_cast<size_t>(counts.size()) != n) {
    throw py::value_error("parse_scores: counts has " + std::to_string(counts.size()) + " entries for " +
                          std::to_string(n) + " texts");
  }
  const int64_t* count = counts.data();
  for (size_t i = 0; i < n; ++i) {
    if (count[i] < 1 || count[i] > n_max) {
      throw py::value_error("parse_scores: counts[" + std::to_string(i) + "] = " + std::to_string(count[i]) +
                            " is outside 1..n_max = " + std::to_string(n_max));
    }
  }

  // UTF-8 views, taken with the GIL held. Compact ASCII strings give their own buffer at no
  // cost; a string with lone surrogates cannot be UTF-8 encoded strictly, so it is encoded
  // with surrogatepass (the score syntax is ASCII, so the result is the same).
  std::vector<const char*> data(n);
  std::vector<size_t> sizes(n);
  std::vector<py::object> keep_alive;
  for (size_t i = 0; i < n; ++i) {
    PyObject* item = PyList_GET_ITEM(texts.ptr(), static_cast<Py_ssize_t>(i));
    if (!PyUnicode_Check(item)) {
      throw py::type_error("parse_scores: texts[" + std::to_string(i) + "] is " + std::string(Py_TYPE(item)->tp_name) +
                           ", expected str");
    }
    Py_ssize_t size = 0;
    const char* utf8 = PyUnicode_AsUTF8AndSize(item, &size);
    if (utf8 == nullptr) {
      PyErr_Clear();
      py::object encoded = py::reinterpret_steal<py::object>(PyUnicode_AsEncodedString(item, "utf-8", "surrogatepass"));
      if (!encoded) throw py::error_already_set();
      utf8 = PyBytes_AS_STRING(encoded.ptr());
      size = PyBytes_GET_SIZE(encoded.ptr());
      keep_alive.push_back(std::move(encoded));
    }
    data[i] = utf8;
    sizes[i] = static_cast<size_t>(size);
  }

  py::array_t<float> scores({static_cast<py::ssize_t>(n), static_cast<py::ssize_t>(n_max)});
  py::array_t<int8_t> status(static_cast<py::ssize_t>(n));
  float* scores_ptr = scores.mutable_data();
  int8_t* status_ptr = status.mutable_data();
  std::fill(scores_ptr, scores_ptr + n * n_max, std::numeric_limits<float>::quiet_NaN());

  auto work = [&](size_t begin, size_t end) {
    for (size_t i = begin; i < end; ++i) {
      status_ptr[i] = grm::parse_one(data[i], sizes[i], count[i], lo, hi, scores_ptr + i * n_max);
    }
  };
  size_t threads = num_threads > 0 ? static_cast<size_t>(num_threads) : std::max(1u, std::thread::hardware_concurrency());
  threads = std::max<size_t>(1, std::min(threads, n / kMinTextsPerThread));
  {
    py::gil_scoped_release release;
    if (threads == 1) {
      work(0, n);
    } else {
      std::vector<std::thread> pool;
      const size_t chunk = (n + threads - 1) / threads;
      for (size_t t = 0; t < threads; ++t) {
        const size_t begin = t * chunk, end = std::min(n, begin + chunk);
        if (begin < end) pool.emplace_back(work, begin, end);
      }
      for (auto& thread : pool) thread.join();
    }
  }
  return py::make_tuple(scores, status);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "grm-engine CPU kernels (C++)";
  m.def("parse_scores", &parse_scores, py::arg("texts"), py::arg("counts"), py::arg("n_max"), py::arg("lo"), py::arg("hi"),
        py::arg("num_threads") = 0,
        "Parse critiques: returns (scores float32 [N, n_max], NaN where absent, status int8 [N]). "
        "Same rule as grm_engine.parsing.parse_scores_reference.");
}
