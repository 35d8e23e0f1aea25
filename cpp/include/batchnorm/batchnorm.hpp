// batchnorm: batch normalization for the CPU. Include this header for the whole C++ API.
#pragma once

#include "batchnorm/functional.hpp"
#include "batchnorm/layer.hpp"
#include "batchnorm/runtime.hpp"
#include "batchnorm/types.hpp"
