"""Models (MLP, 1-D and 2-D CNNs) built from a plain config dict: loss and gradients, inference."""
import math
import numbers
import re
from collections.abc import Callable, Mapping
from functools import partial
from itertools import groupby
from typing import NamedTuple

import numpy as np

from nncore import layers, parallel
from nncore.errors import ConfigError
from nncore.init import INIT_KINDS, init_weight
from nncore.losses import l2_penalty, softmax, softmax_loss, svm_loss

MODEL_DEFAULTS = {
    "arch": "mlp",
    "hidden": [128],
    "activation": "relu",
    "leaky_alpha": 0.01,
    "elu_alpha": 1.0,
    "maxout_pieces": 2,
    "dropout": 0.0,
    "batchnorm": False,
    "init": "he",
    "init_scale": 0.01,
    "loss": "softmax",
    "conv_channels": [16],
    "conv_kernel": 5,
    "conv_pool": 2,
}
ARCHS = ("mlp", "conv1d", "conv2d")
# arch -> (spatial dims, per-sample input description, what conv blocks shrink, conv fwd/bwd, pool fwd/bwd)
_CONV_ARCHS = {
    "conv1d": (1, "(channels, length)", "the sequence to length 0", layers.conv1d_forward, layers.conv1d_backward,
               layers.maxpool1d_forward, layers.maxpool1d_backward),
    "conv2d": (2, "(channels, height, width)", "the image to size 0", layers.conv2d_forward, layers.conv2d_backward,
               layers.maxpool2d_forward, layers.maxpool2d_backward),
}
ACTIVATIONS = ("relu", "leaky_relu", "elu", "tanh", "sigmoid", "maxout")
# Model fields each activation reads (the one source of which activation parameter applies).
ACTIVATION_READS = {"relu": (), "leaky_relu": ("leaky_alpha",), "elu": ("elu_alpha",), "tanh": (), "sigmoid": (),
                    "maxout": ("maxout_pieces",)}
# Model fields only the convolutional archs read.
ARCH_READS = {"mlp": (), "conv1d": ("conv_channels", "conv_kernel", "conv_pool"),
              "conv2d": ("conv_channels", "conv_kernel", "conv_pool")}
LOSSES = {"softmax": softmax_loss, "svm": svm_loss}
MAX_UNITS = 65536
MAX_LAYERS = 64
MAX_CONV_BLOCKS = 16
MAX_PARAMS = 50_000_000

_PARAM_NAME = re.compile(r"(?:W|b|gamma|beta)(c?)(\d+)|bn(c?)(\d+)_(?:mean|var)")


def layer_of(name):
    """The layer a parameter or buffer belongs to: "W2" -> "layer2", "gammac1" / "bnc1_var" -> "conv1"."""
    match = _PARAM_NAME.fullmatch(name)
    if match is None:
        raise ValueError(f"layer_of: {name!r} is not a model parameter or buffer name")
    conv, index = match.group(1, 2) if match[2] else match.group(3, 4)
    return ("conv" if conv else "layer") + index


def _fail(field, expected, value):
    raise ConfigError(f"model.{field}: expected {expected}, got {value!r}")


def _is_int(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _int(field, value, lo, hi):
    if not (_is_int(value) and lo <= value <= hi):
        _fail(field, f"an int in [{lo}, {hi}]", value)
    return int(value)


def _int_list(field, value, lo, hi, max_len, min_len=0):
    if not (isinstance(value, (list, tuple)) and min_len <= len(value) <= max_len
            and all(_is_int(v) and lo <= v <= hi for v in value)):
        _fail(field, f"a list of {min_len} to {max_len} ints in [{lo}, {hi}]", value)
    return [int(v) for v in value]


def _number(field, value, lo, hi, lo_open=False, hi_open=False):
    ok = (isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
          and (lo < value if lo_open else lo <= value) and (value < hi if hi_open else value <= hi))
    if not ok:
        _fail(field, f"a number in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}", value)
    return float(value)


def _choice(field, value, choices):
    if not (isinstance(value, str) and value in choices):
        _fail(field, "one of " + ", ".join(map(repr, choices)), value)
    return str(value)


def _bool(field, value):
    if not isinstance(value, (bool, np.bool_)):
        _fail(field, "true or false", value)
    return bool(value)


_CHECKS = {
    "arch": partial(_choice, choices=ARCHS),
    "hidden": partial(_int_list, lo=1, hi=MAX_UNITS, max_len=MAX_LAYERS),
    "activation": partial(_choice, choices=ACTIVATIONS),
    "leaky_alpha": partial(_number, lo=0.0, hi=1.0, hi_open=True),
    "elu_alpha": partial(_number, lo=0.0, hi=10.0, lo_open=True),
    "maxout_pieces": partial(_int, lo=2, hi=16),
    "dropout": partial(_number, lo=0.0, hi=1.0, hi_open=True),
    "batchnorm": _bool,
    "init": partial(_choice, choices=INIT_KINDS),
    "init_scale": partial(_number, lo=0.0, hi=10.0, lo_open=True),
    "loss": partial(_choice, choices=tuple(LOSSES)),
    "conv_channels": partial(_int_list, lo=1, hi=MAX_UNITS, max_len=MAX_CONV_BLOCKS, min_len=1),
    "conv_kernel": partial(_int, lo=1, hi=1024),
    "conv_pool": partial(_int, lo=1, hi=1024),
}


def _pieces(cfg):
    """Linear units per output unit: maxout_pieces for maxout, else 1."""
    return cfg["maxout_pieces"] if cfg["activation"] == "maxout" else 1


def _size_error(field, total, context):
    return ConfigError(f"model.{field}: {total:,} parameters {context} exceed the limit of {MAX_PARAMS:,}")


def validate_model_config(cfg):
    """A complete, normalized copy of a model config: defaults filled in, every field type- and range-checked.

    Raises ConfigError naming the field ("model.<field>: ..."). Absurd sizes are refused here, before
    anything is allocated (the exact parameter count is checked again once input shape and classes are known).
    """
    if not isinstance(cfg, Mapping):
        raise ConfigError(f"model: expected a table of fields, got {type(cfg).__name__}")
    unknown = sorted(str(key) for key in cfg if key not in MODEL_DEFAULTS)
    if unknown:
        raise ConfigError(f"model.{unknown[0]}: unknown field (known: {', '.join(sorted(MODEL_DEFAULTS))})")
    out = {field: check(field, cfg.get(field, MODEL_DEFAULTS[field])) for field, check in _CHECKS.items()}
    hidden = out["hidden"]
    between = sum(a * b * _pieces(out) for a, b in zip(hidden, hidden[1:]))
    if between > MAX_PARAMS:
        raise _size_error("hidden", between, "between hidden layers alone")
    return out


def _conv_pad(kernel):
    """Zero padding that keeps the length (each spatial size) for odd kernels (stride 1)."""
    return (kernel - 1) // 2


def _shapes(cfg, input_shape, num_classes):
    """({param: shape}, {buffer: shape}) in layer order for a validated config; ConfigError if too big."""
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    if not input_shape or min(input_shape) < 1:
        raise ValueError(f"input_shape must be a non-empty tuple of positive sizes, got {input_shape}")
    params, buffers = {}, {}
    pieces = _pieces(cfg)

    def add_layer(suffix, weight_shape, units):
        params[f"W{suffix}"] = weight_shape
        if not cfg["batchnorm"]:
            params[f"b{suffix}"] = (units,)
        else:
            params[f"gamma{suffix}"] = params[f"beta{suffix}"] = (units,)
            buffers[f"bn{suffix}_mean"] = buffers[f"bn{suffix}_var"] = (units,)

    if cfg["arch"] in _CONV_ARCHS:
        dims, described, shrunk = _CONV_ARCHS[cfg["arch"]][:3]
        if len(input_shape) != dims + 1:
            raise ConfigError(f"model.arch: '{cfg['arch']}' needs per-sample inputs shaped {described}, "
                              f"got input shape {input_shape}")
        channels, *size = input_shape
        kernel, pool = cfg["conv_kernel"], cfg["conv_pool"]
        for i, filters in enumerate(cfg["conv_channels"], 1):
            add_layer(f"c{i}", (filters * pieces, channels) + (kernel,) * dims, filters * pieces)
            size = [(length + 2 * _conv_pad(kernel) - kernel + 1) // pool for length in size]
            if min(size) < 1:
                raise ConfigError(f"model.conv_channels: conv block {i} shrinks {shrunk} (input shape "
                                  f"{input_shape}, conv_kernel {kernel}, conv_pool {pool})")
            channels = filters
        width = channels * math.prod(size)
    else:
        width = math.prod(input_shape)
    for i, units in enumerate(cfg["hidden"], 1):
        add_layer(str(i), (width, units * pieces), units * pieces)
        width = units
    out = len(cfg["hidden"]) + 1
    params[f"W{out}"], params[f"b{out}"] = (width, num_classes), (num_classes,)
    total = sum(math.prod(shape) for shape in params.values())
    if total > MAX_PARAMS:
        conv = sum(math.prod(s) for name, s in params.items() if layer_of(name).startswith("conv"))
        field = "conv_channels" if 2 * conv > total else "hidden"
        raise _size_error(field, total, f"(input shape {input_shape}, {num_classes} classes)")
    return params, buffers


def _conv_macs_per_sample(cfg, input_shape, param_shapes):
    """Multiply-adds of one sample's forward pass through the conv blocks (0 for an MLP)."""
    total, size = 0, list(input_shape[1:])
    for name, shape in param_shapes.items():
        if name.startswith("Wc"):
            kernel = cfg["conv_kernel"]
            size = [length + 2 * _conv_pad(kernel) - kernel + 1 for length in size]
            total += math.prod(shape) * math.prod(size)
            size = [length // cfg["conv_pool"] for length in size]
    return total


def _fans(shape):
    """(fan_in, fan_out) of an affine weight (D, H) or a conv weight (F, C, K) / (F, C, KH, KW)."""
    if len(shape) >= 3:
        filters, channels, *kernel = shape
        return channels * math.prod(kernel), filters * math.prod(kernel)
    return shape


def _relu_inplace(z):
    return layers.relu_forward(z, out=z)


def _relu_backward_inplace(dout, cache):
    return layers.relu_backward(dout, cache, out=dout)


def _activation(cfg):
    """(forward, backward) of the configured nonlinearity. Every input the model hands these is a fresh
    array it owns (the output of a linear or batchnorm layer, or a gradient just computed), so ReLU works in place."""
    kind = cfg["activation"]
    return {
        "relu": (_relu_inplace, _relu_backward_inplace),
        "leaky_relu": (partial(layers.leaky_relu_forward, alpha=cfg["leaky_alpha"]), layers.leaky_relu_backward),
        "elu": (partial(layers.elu_forward, alpha=cfg["elu_alpha"]), layers.elu_backward),
        "tanh": (layers.tanh_forward, layers.tanh_backward),
        "sigmoid": (layers.sigmoid_forward, layers.sigmoid_backward),
        "maxout": (partial(layers.max_pieces_forward, pieces=cfg["maxout_pieces"]), layers.max_pieces_backward),
    }[kind]


class _Step(NamedTuple):
    """One step of a network (Model._steps)."""

    forward: Callable  # (h, rows) -> (h, cache); rows: the slice of the minibatch h holds
    backward: Callable  # (dout, cache) -> dx, or (dx, *parameter gradients) with names
    names: tuple = ()  # the parameters it has gradients for
    per_sample: bool = True  # False: batchnorm on batch statistics, the one step that mixes samples
    layer: str | None = None  # a nonlinearity's output: the activations of this layer


def _backward(tape, dout):
    """Run ``tape`` backward from dout: (the gradient w.r.t. the tape's input, {param: gradient})."""
    grads = {}
    for backward, cache, names in reversed(tape):
        if names:
            dout, *dparams = backward(dout, cache)
            grads.update(zip(names, dparams))
        else:
            dout = backward(dout, cache)
    return dout, grads


def _chunked_backward(dout, cache):
    """Backward of a chunked run (Model._run_chunked): each chunk's tape on its rows of dout, at once; returns
    the input gradient (None for the data) and the parameter gradients summed over the chunks, in tape order."""
    parts, tapes, first = cache
    results = parallel.run(lambda part: _backward(part[1], dout[part[0]]), list(zip(parts, tapes)))
    dx = None if first else np.concatenate([r[0] for r in results])
    names = [name for _, _, step_names in tapes[0] for name in step_names]
    sums = [results[0][1][name] for name in names]  # fresh arrays of this backward: summed in place
    for _, grads in results[1:]:
        for total, name in zip(sums, names):
            total += grads[name]
    return (dx, *sums)


def _check_arrays(kind, arrays, shapes):
    if set(arrays) != set(shapes):
        raise ValueError(f"{kind}: expected arrays {sorted(shapes)}, got {sorted(arrays)}")
    for name, shape in shapes.items():
        if arrays[name].shape != shape:
            raise ValueError(f"{kind}[{name!r}]: expected shape {shape}, got {arrays[name].shape}")


class Model:
    """A network (conv blocks, hidden layers, output layer) with its parameters and batchnorm buffers.

    Parameter names: "W{i}", "b{i}" for hidden layer i and the output layer (i = len(hidden) + 1);
    "Wc{i}", "bc{i}" for conv block i; with batchnorm, hidden layers and conv blocks have "gamma{i}",
    "beta{i}" / "gammac{i}", "betac{i}" instead of the bias. Buffers:
    "bn{i}_mean", "bn{i}_var", "bnc{i}_mean", "bnc{i}_var". Layers: "conv{i}", "layer{i}" (see layer_of).
    """

    layer_of = staticmethod(layer_of)

    def __init__(self, config, input_shape, num_classes, params, buffers):
        self.config = validate_model_config(config)
        self.input_shape = tuple(int(d) for d in input_shape)
        self.num_classes = int(num_classes)
        param_shapes, buffer_shapes = _shapes(self.config, self.input_shape, self.num_classes)
        _check_arrays("params", params, param_shapes)
        _check_arrays("buffers", buffers, buffer_shapes)
        self.params = {name: params[name] for name in param_shapes}
        self.buffers = {name: buffers[name] for name in buffer_shapes}
        dtypes = {a.dtype for a in (*self.params.values(), *self.buffers.values())}
        if len(dtypes) != 1 or not np.issubdtype(next(iter(dtypes)), np.floating):
            raise ValueError(f"params and buffers must share one float dtype, got {sorted(map(str, dtypes))}")
        self.weight_names = [name for name in param_shapes if name.startswith("W")]
        self.layer_names = list(dict.fromkeys(map(layer_of, param_shapes)))
        self._act_forward, self._act_backward = _activation(self.config)
        self._conv_macs = _conv_macs_per_sample(self.config, self.input_shape, param_shapes)
        self._data_loss = LOSSES[self.config["loss"]]

    @property
    def dtype(self):
        return next(iter(self.params.values())).dtype

    def _input(self, x):
        x = np.asarray(x, dtype=self.dtype)
        if x.shape[1:] != self.input_shape:
            raise ValueError(f"model expects inputs shaped (N, {', '.join(map(str, self.input_shape))}), "
                             f"got {x.shape}")
        return x

    def _steps(self, params, train, masks):
        """The network as a list of steps: linear (conv for conv blocks, else affine), optional batchnorm,
        max pooling (conv blocks with conv_pool > 1), nonlinearity, dropout (hidden layers), the output layer.

        Dropout takes its mask's rows for the rows a step's forward is given.

        A layer followed by batchnorm has no bias: beta takes its role (a bias there has zero gradient).
        Pooling comes before the nonlinearity: every activation is non-decreasing, so max-pooling then
        activating gives the same values and gradients as the usual activate-then-pool, with the
        activation on a pool-th of the entries (and no ReLU zeros tying the pooling windows).
        """
        cfg = self.config
        steps = []

        def hidden(suffix, conv):
            w, b = f"W{suffix}", f"b{suffix}"
            bias, names = (None, (w,)) if cfg["batchnorm"] else (params[b], (w, b))
            if conv:
                conv_forward, conv_backward, pool_forward, pool_backward = _CONV_ARCHS[cfg["arch"]][3:]
                pad = _conv_pad(cfg["conv_kernel"])
                steps.append(_Step(lambda h, rows: conv_forward(h, params[w], bias, pad=pad), conv_backward, names))
            else:
                steps.append(_Step(lambda h, rows: layers.affine_forward(h, params[w], bias), layers.affine_backward,
                                   names))
            if cfg["batchnorm"]:
                state = {"mean": self.buffers[f"bn{suffix}_mean"], "var": self.buffers[f"bn{suffix}_var"]}
                gamma, beta = f"gamma{suffix}", f"beta{suffix}"
                steps.append(_Step(lambda h, rows: layers.batchnorm_forward(h, params[gamma], params[beta], state,
                                                                            train),
                                   layers.batchnorm_backward, (gamma, beta), per_sample=not train))
            if conv and cfg["conv_pool"] > 1:
                steps.append(_Step(lambda h, rows: pool_forward(h, cfg["conv_pool"]), pool_backward))
            steps.append(_Step(lambda h, rows: self._act_forward(h), self._act_backward, layer=layer_of(w)))

        conv_blocks = len(cfg["conv_channels"]) if cfg["arch"] in _CONV_ARCHS else 0
        for i in range(1, conv_blocks + 1):
            hidden(f"c{i}", True)
        for i in range(1, len(cfg["hidden"]) + 1):
            hidden(str(i), False)
            if masks:
                mask = masks[f"layer{i}"]
                steps.append(_Step(lambda h, rows, mask=mask: layers.dropout_forward(h, cfg["dropout"], True,
                                                                                     mask=mask[rows]),
                                   layers.dropout_backward))
        out = len(cfg["hidden"]) + 1
        steps.append(_Step(lambda h, rows: layers.affine_forward(h, params[f"W{out}"], params[f"b{out}"]),
                           layers.affine_backward, (f"W{out}", f"b{out}")))
        return steps

    def _forward(self, x, params, train, masks=None, tape=None, acts=None):
        """Scores for x; records backward steps on `tape` and hidden activations in `acts` when given.

        Runs of per-sample steps go through ``_run_chunked`` (the minibatch split over nncore.parallel's
        threads); batchnorm on batch statistics runs on the whole minibatch between them.
        """
        h = x
        for _, run in groupby(self._steps(params, train, masks), key=lambda step: step.per_sample):
            h = self._run_chunked(list(run), h, tape, acts)
        return h

    def _run_chunked(self, steps, x, tape, acts):
        """Run ``steps`` on x, the rows split into nncore.parallel's chunks (one chunk: in this thread, each
        step's backward recorded on ``tape`` as it is); with several chunks the run is one tape entry whose
        backward runs every chunk's steps backward at once and sums their parameter gradients."""
        parts = parallel.chunks(len(x), self._conv_macs) if steps[0].per_sample else [slice(None)]
        first = tape is not None and not tape  # no input gradient w.r.t. the data

        def run(rows):
            h, sub, seen = x[rows], [] if tape is not None else None, {}
            for step in steps:
                h, cache = step.forward(h, rows)
                if sub is not None:
                    sub.append((partial(step.backward, input_grad=False) if first and not sub else step.backward,
                                cache, step.names))
                if acts is not None and step.layer is not None:
                    seen[step.layer] = h
            return h, sub, seen

        results = parallel.run(run, parts)
        if len(results) == 1:
            h, sub, seen = results[0]
            if tape is not None:
                tape.extend(sub)
        else:
            h = np.concatenate([r[0] for r in results])
            seen = {layer: np.concatenate([r[2][layer] for r in results]) for layer in results[0][2]}
            if tape is not None:
                names = tuple(name for step in steps for name in step.names)
                tape.append((_chunked_backward, (parts, [r[1] for r in results], first), names))
        if acts is not None:
            acts.update(seen)
        return h

    def sample_dropout_masks(self, n, rng):
        """{"layer{i}": inverted-dropout mask (n, hidden[i-1])} for every hidden layer; {} without dropout."""
        p = self.config["dropout"]
        if p == 0:
            return {}
        return {f"layer{i}": layers.dropout_mask((n, units), p, rng, self.dtype)
                for i, units in enumerate(self.config["hidden"], 1)}

    def _masks(self, n, train, rng, given):
        if given is not None and not train:
            raise ValueError("dropout_masks apply only with train=True")
        if not train or self.config["dropout"] == 0:
            return None
        if given is not None:
            return given
        if rng is None:
            raise ValueError("Model.loss: train=True with dropout needs rng or dropout_masks")
        return self.sample_dropout_masks(n, rng)

    def loss(self, x, y, *, reg=0.0, train=True, rng=None, dropout_masks=None):
        """(data loss + L2 penalty on weight_names, {param: gradient}).

        train=True: dropout (masks drawn from rng unless dropout_masks are given) and batch statistics
        (updating the running statistics in buffers); train=False: no dropout, running statistics.
        """
        x = self._input(x)
        tape = []
        scores = self._forward(x, self.params, train, self._masks(len(x), train, rng, dropout_masks), tape)
        loss, dout = self._data_loss(scores, np.asarray(y))
        _, grads = _backward(tape, dout)
        grads = {name: grads[name] for name in self.params}
        return loss + l2_penalty(self.params, self.weight_names, reg, grads), grads

    def scores(self, x, params=None):
        """Logits in test mode; `params` (same names, e.g. EMA weights) overrides self.params."""
        return self._forward(self._input(x), self.params if params is None else params, train=False)

    def predict_proba(self, x, params=None):
        """Softmax class probabilities in test mode."""
        return softmax(self.scores(x, params))

    def activations(self, x):
        """{layer: post-nonlinearity activations} of every conv block (after its pooling) and hidden layer,
        in test mode."""
        acts = {}
        self._forward(self._input(x), self.params, train=False, acts=acts)
        return acts

    def astype(self, dtype):
        """A copy of the model with params and buffers cast to dtype."""
        params = {name: a.astype(dtype) for name, a in self.params.items()}
        buffers = {name: a.astype(dtype) for name, a in self.buffers.items()}
        return type(self)(self.config, self.input_shape, self.num_classes, params, buffers)


def build_model(cfg, input_shape, num_classes, seed, dtype=np.float32):
    """A freshly initialized Model: weights by cfg["init"], zero biases and betas, unit gammas,
    running mean 0 and variance 1. Sizes are checked before anything is allocated."""
    cfg = validate_model_config(cfg)
    input_shape = tuple(int(d) for d in input_shape)
    param_shapes, buffer_shapes = _shapes(cfg, input_shape, int(num_classes))
    rng = np.random.default_rng(seed)
    params = {}
    for name, shape in param_shapes.items():
        if name.startswith("W"):
            params[name] = init_weight(cfg["init"], shape, *_fans(shape), rng, cfg["init_scale"], dtype)
        else:
            params[name] = (np.ones if name.startswith("gamma") else np.zeros)(shape, dtype=dtype)
    buffers = {name: (np.ones if name.endswith("_var") else np.zeros)(shape, dtype=dtype)
               for name, shape in buffer_shapes.items()}
    return Model(cfg, input_shape, num_classes, params, buffers)
