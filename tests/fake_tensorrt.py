"""A stand-in for the ``tensorrt`` module with the shape of TensorRT's documented Python API
(Builder, INetworkDefinition, OnnxParser, IBuilderConfig, IOptimizationProfile, Runtime), which
records what samedge asks of it. It lets CPU tests drive the builder and the runtime backend's
glue; it computes nothing. Layer naming follows onnx-tensorrt's ``ImporterContext::registerLayer``
(a node's first layer takes the node's name, further layers ``<name>_<n>``).
"""

from __future__ import annotations

import enum
import types


def make(version: str, extra_layers: dict[str, int] | None = None) -> types.ModuleType:
    """A fake ``tensorrt`` of ``version``; ``extra_layers``: node → how many further layers the
    parser makes for it (LayerNormalization on 8.6 makes several)."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    major = int(version.split(".")[0])
    trt.calls = []  # everything asked of the builder, in order

    class DataType(enum.Enum):
        FLOAT = 0
        HALF = 1
        INT32 = 3

    trt.DataType, trt.float32, trt.float16, trt.int32 = (DataType, DataType.FLOAT, DataType.HALF,
                                                          DataType.INT32)
    members = {"EXPLICIT_BATCH": 0}
    if major >= 10:
        members = {"EXPLICIT_BATCH": 0, "STRONGLY_TYPED": 1}
    trt.NetworkDefinitionCreationFlag = enum.IntEnum("NetworkDefinitionCreationFlag", members)
    trt.BuilderFlag = enum.Enum("BuilderFlag", ["FP16", "INT8", "TF32", "VERSION_COMPATIBLE",
                                                "OBEY_PRECISION_CONSTRAINTS"])
    trt.MemoryPoolType = enum.Enum("MemoryPoolType", ["WORKSPACE"])
    trt.HardwareCompatibilityLevel = enum.Enum("HardwareCompatibilityLevel", ["NONE",
                                                                             "AMPERE_PLUS"])
    trt.TensorIOMode = enum.Enum("TensorIOMode", ["INPUT", "OUTPUT"])

    class Logger:
        WARNING = 2

        def __init__(self, severity=None):
            self.severity = severity

    class Tensor:
        def __init__(self, dtype):
            self.dtype = dtype

    class Layer:
        def __init__(self, name: str):
            self.name, self._precision = name, None
            self.outputs = [Tensor(DataType.HALF), Tensor(DataType.INT32)]
            self.output_types: dict[int, DataType] = {}

        @property
        def precision(self):
            return self._precision

        @precision.setter
        def precision(self, value):
            self._precision = value

        @property
        def num_outputs(self):
            return len(self.outputs)

        def get_output(self, index):
            return self.outputs[index]

        def set_output_type(self, index, dtype):
            self.output_types[index] = dtype

    class Network:
        def __init__(self, flags: int):
            self.flags, self.layers = flags, []

        @property
        def num_layers(self):
            return len(self.layers)

        def get_layer(self, index):
            return self.layers[index]

    class OnnxParser:
        def __init__(self, network, logger):
            self.network, self.num_errors = network, 0

        def parse_from_file(self, path: str) -> bool:
            import onnx

            model = onnx.load(path, load_external_data=False)
            for node in model.graph.node:
                self.network.layers.append(Layer(node.name))
                for n in range((extra_layers or {}).get(node.name, 0)):
                    self.network.layers.append(Layer(f"{node.name}_{n + 1}"))
            return True

        def get_error(self, index):
            raise IndexError(index)

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, low, opt, high):
            self.shapes[name] = (tuple(low), tuple(opt), tuple(high))

    class Config:
        def __init__(self):
            self.flags, self.cleared, self.profiles, self.pools = set(), set(), [], {}
            self.hardware_compatibility_level = trt.HardwareCompatibilityLevel.NONE

        def set_memory_pool_limit(self, pool, size):
            self.pools[pool] = size

        def set_flag(self, flag):
            self.flags.add(flag)

        def clear_flag(self, flag):
            self.cleared.add(flag)
            self.flags.discard(flag)

        def add_optimization_profile(self, profile):
            self.profiles.append(profile)

    class Builder:
        def __init__(self, logger):
            self.logger = logger

        def create_network(self, flags: int = 0):
            trt.network = Network(flags)
            return trt.network

        def create_builder_config(self):
            trt.config = Config()
            return trt.config

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            trt.calls.append(("build", network, config))
            return b"serialized engine"

    class Engine:
        num_io_tensors = 2

        def get_tensor_name(self, index):
            return ("x", "y")[index]

        def get_tensor_mode(self, name):
            return trt.TensorIOMode.INPUT if name == "x" else trt.TensorIOMode.OUTPUT

    class Runtime:
        def __init__(self, logger):
            self.engine_host_code_allowed = False
            trt.runtime = self

        def deserialize_cuda_engine(self, data: bytes):
            trt.calls.append(("deserialize", self.engine_host_code_allowed))
            return Engine()

    trt.Logger, trt.Builder, trt.OnnxParser, trt.Runtime = Logger, Builder, OnnxParser, Runtime
    return trt
