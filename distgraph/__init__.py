"""distgraph: computational graphs with reverse-mode autodiff, run level by level on Ray actors.

The public surface is re-exported here explicitly; everything else is internal.
"""

from . import datasets as datasets
from . import nn as nn
from . import testing as testing
from .autodiff import grad as grad
from .errors import CheckpointError as CheckpointError
from .errors import ClusterError as ClusterError
from .errors import ConfigError as ConfigError
from .errors import CycleError as CycleError
from .errors import DistgraphError as DistgraphError
from .errors import DTypeError as DTypeError
from .errors import ExecutionError as ExecutionError
from .errors import FeedError as FeedError
from .errors import GradientCheckError as GradientCheckError
from .errors import GraphError as GraphError
from .errors import NonFiniteError as NonFiniteError
from .errors import ResourceError as ResourceError
from .errors import ShapeError as ShapeError
from .errors import SpecError as SpecError
from .errors import UnknownOpError as UnknownOpError
from .errors import WaveTimeoutError as WaveTimeoutError
from .errors import WorkerLostError as WorkerLostError
from .functional import abs as abs
from .functional import avg_pool2d as avg_pool2d
from .functional import broadcast_to as broadcast_to
from .functional import causal_mask as causal_mask
from .functional import concat as concat
from .functional import conv2d as conv2d
from .functional import cross_entropy as cross_entropy
from .functional import dropout as dropout
from .functional import einsum as einsum
from .functional import embedding as embedding
from .functional import exp as exp
from .functional import gelu as gelu
from .functional import layer_norm as layer_norm
from .functional import log as log
from .functional import log_softmax as log_softmax
from .functional import matmul as matmul
from .functional import max as max
from .functional import max_pool2d as max_pool2d
from .functional import maximum as maximum
from .functional import mean as mean
from .functional import minimum as minimum
from .functional import mse as mse
from .functional import relu as relu
from .functional import reshape as reshape
from .functional import sigmoid as sigmoid
from .functional import softmax as softmax
from .functional import softplus as softplus
from .functional import split as split
from .functional import sqrt as sqrt
from .functional import stack as stack
from .functional import stop_gradient as stop_gradient
from .functional import sum as sum
from .functional import tanh as tanh
from .functional import transpose as transpose
from .functional import where as where
from .graph import Graph as Graph
from .graph import Node as Node
from .lr import ConstantLR as ConstantLR
from .lr import CosineLR as CosineLR
from .lr import LRSchedule as LRSchedule
from .lr import StepDecayLR as StepDecayLR
from .lr import WarmupLR as WarmupLR
from .nnops import step_scope as step_scope
from .optim import SGD as SGD
from .optim import Adam as Adam
from .optim import Momentum as Momentum
from .optim import Optimizer as Optimizer
from .partition import STRATEGIES as STRATEGIES
from .partition import partition as partition
from .plan import Plan as Plan
from .result import Result as Result
from .result import TraceEvent as TraceEvent
from .runtime.local import LocalExecutor as LocalExecutor
from .spec import GraphSpec as GraphSpec
from .spec import NodeSpec as NodeSpec
from .train import History as History
from .train import Trainer as Trainer

__version__ = "0.1.0"


def __getattr__(name: str):
    # Ray is imported only when the Ray executor is asked for: the core runs without it.
    if name == "RayExecutor":
        from .runtime.ray import RayExecutor

        return RayExecutor
    raise AttributeError(f"module 'distgraph' has no attribute {name!r}")
