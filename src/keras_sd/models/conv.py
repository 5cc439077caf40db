"""3x3 convolutions by Winograd's F(2x2, 3x3) or as one matrix product, and `Conv3x3`,
the `Conv2D` that picks one of them or the backend's convolution per call.

`set_conv_algorithm` is a process-wide switch: `Conv3x3` reads it when it computes
(at trace time when compiled).
"""

from __future__ import annotations

import keras
from keras import layers, ops

from keras_sd import backend

CONV_ALGORITHMS = ("auto", "direct", "winograd", "gemm")
_conv_algorithm = {"value": "auto"}

# Conv3x3 "auto": Winograd from this many 2x2 output tiles (batch x H/2 x W/2) up; below
# it the transformed kernel (16/9 of the weights) is re-read for too few tiles to pay off.
WINOGRAD_MIN_TILES = 256

# Conv3x3 "auto": one matrix product over the 3x3 patches (`gemm_conv3x3`) where
# TensorFlow's own CPU convolution (oneDNN) is slowest: kernels of many megabytes applied
# to few output positions. A call takes it when its rows (batch x H x W) are at most and
# its kernel's bytes in the compute dtype at least either (rows, bytes) pair below, the
# bounds of where it beats `tf.nn.conv2d` (whose kernel is re-laid out on every call);
# see benchmarks/RESULTS.md.
GEMM_RULES = ((512, 40e6), (128, 14e6))

# `Upsample2D` computes its nearest x2 upsampling and 3x3 convolution from the input by
# `upsample_conv3x3` (16 products per 2x2 output block instead of 36) on a TensorFlow CPU
# outside XLA, in low precision, for inputs of at least this many positions (batch x H x W):
# its four kernels are re-laid out per call, which only large inputs repay.
PHASE_UPSAMPLE_MIN_ROWS = 1024


def set_conv_algorithm(algorithm: str) -> str:
    """Choose how `Conv3x3` layers compute; returns the previous choice.

    Args:
        algorithm: "auto" (default): each algorithm where it is the fastest.
            Winograd's F(2x2, 3x3) while `keras_sd.backend.compile_function` traces
            for XLA (TensorFlow XLA or JAX) on a CPU, in float32, for inputs of at
            least `WINOGRAD_MIN_TILES` output tiles; one matrix product over the
            patches (`gemm_conv3x3`) on a TensorFlow CPU outside XLA where
            `GEMM_RULES` says the kernel is large for the number of output positions;
            the backend's convolution otherwise. "direct": always the backend's
            convolution. "winograd" / "gemm": that algorithm for every eligible call
            (any backend, device and dtype; Winograd needs even sizes), for tests and
            experiments.

    Example:
    >>> previous = set_conv_algorithm("direct")
    >>> set_conv_algorithm(previous)
    'direct'
    """
    if algorithm not in CONV_ALGORITHMS:
        raise ValueError(
            f"set_conv_algorithm: algorithm must be one of {CONV_ALGORITHMS}; "
            f"received {algorithm!r}."
        )
    previous, _conv_algorithm["value"] = _conv_algorithm["value"], algorithm
    return previous


backend.register_trace_setting(lambda: _conv_algorithm["value"])


def _f23_data(d0, d1, d2, d3):
    """Winograd F(2, 3) input transform (B^T d) along one axis."""
    return [d0 - d2, d1 + d2, d2 - d1, d1 - d3]


def _f23_kernel(g0, g1, g2):
    """Winograd F(2, 3) kernel transform (G g) along one axis."""
    return [g0, (g0 + g1 + g2) * 0.5, (g0 - g1 + g2) * 0.5, g2]


def _f23_output(m0, m1, m2, m3):
    """Winograd F(2, 3) output transform (A^T m) along one axis."""
    return [m0 + m1 + m2, m1 - m2 - m3]


def winograd_conv3x3(x, kernel):
    """A 3x3, stride-1, "same"-padded convolution by Winograd's F(2x2, 3x3) algorithm.

    Each 2x2 output tile comes from a 4x4 input tile: both are transformed so the
    convolution becomes 16 matrix products of [tiles, Cin] by [Cin, Cout], 16
    multiplications per tile and channel pair instead of the direct form's 36. The
    transforms are additions (and halvings of the kernel), fused by XLA. The result
    equals the direct convolution up to float rounding.

    Args:
        x: `[B, H, W, Cin]` with static, even H and W.
        kernel: `[3, 3, Cin, Cout]`.

    Returns:
        `[B, H, W, Cout]`.

    Example:
    >>> import numpy as np
    >>> x = np.random.default_rng(0).standard_normal((1, 4, 6, 3)).astype("float32")
    >>> k = np.random.default_rng(1).standard_normal((3, 3, 3, 2)).astype("float32")
    >>> direct = keras.ops.conv(x, k, padding="same")
    >>> float(keras.ops.max(keras.ops.abs(winograd_conv3x3(x, k) - direct))) < 1e-4
    True
    """
    n, h, w, cin = x.shape
    cout = kernel.shape[-1]
    if h is None or w is None or h % 2 or w % 2:
        raise ValueError(
            f"winograd_conv3x3: x must have static, even height and width; received "
            f"shape {tuple(x.shape)}."
        )
    th, tw = h // 2, w // 2
    xp = ops.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    tiles = []
    for rows in _f23_data(*(xp[:, a : a + 2 * th : 2] for a in range(4))):
        tiles += _f23_data(*(rows[:, :, b : b + 2 * tw : 2] for b in range(4)))
    tiles = ops.reshape(ops.stack(tiles, axis=0), (16, -1, cin))  # [16, B*th*tw, Cin]
    u = []
    for rows in _f23_kernel(kernel[0], kernel[1], kernel[2]):
        u += _f23_kernel(rows[0], rows[1], rows[2])
    m = ops.reshape(ops.matmul(tiles, ops.stack(u, axis=0)), (4, 4, -1, th, tw, cout))
    t0, t1 = _f23_output(m[0], m[1], m[2], m[3])  # each [4, B, th, tw, Cout]
    y0, y1 = (ops.stack(_f23_output(t[0], t[1], t[2], t[3]), axis=3) for t in (t0, t1))
    return ops.reshape(ops.stack([y0, y1], axis=2), (-1, h, w, cout))  # [B, th, 2, tw, 2, C]


def _itemsize(dtype) -> int:
    """Bytes per element of a float dtype ("bfloat16" -> 2)."""
    return int("".join(c for c in keras.backend.standardize_dtype(dtype) if c.isdigit())) // 8


def gemm_conv3x3(x, kernel):
    """A 3x3, stride-1, "same"-padded convolution as one matrix product ("im2col").

    The nine shifted copies of the zero-padded input are concatenated along channels,
    `[B*H*W, 9*Cin]`, and multiplied by the kernel read as `[9*Cin, Cout]` (its memory
    order already), so the work is one large `matmul` and the kernel is used as stored.
    Costs a patch buffer nine times the input's size. Equals the direct convolution up
    to float rounding.

    Args:
        x: `[B, H, W, Cin]` with static H, W and Cin.
        kernel: `[3, 3, Cin, Cout]`.

    Returns:
        `[B, H, W, Cout]`.

    Example:
    >>> import numpy as np
    >>> x = np.random.default_rng(0).standard_normal((1, 5, 3, 2)).astype("float32")
    >>> k = np.random.default_rng(1).standard_normal((3, 3, 2, 4)).astype("float32")
    >>> direct = keras.ops.conv(x, k, padding="same")
    >>> float(keras.ops.max(keras.ops.abs(gemm_conv3x3(x, k) - direct))) < 1e-4
    True
    """
    _, h, w, cin = x.shape
    cout = kernel.shape[-1]
    if h is None or w is None or cin is None:
        raise ValueError(
            "gemm_conv3x3: x must have static height, width and channels; received "
            f"shape {tuple(x.shape)}."
        )
    xp = ops.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    # (row offset, column offset, channel): the order of the kernel's first three axes.
    patches = ops.concatenate([xp[:, a : a + h, b : b + w] for a in range(3) for b in range(3)], -1)
    out = ops.matmul(ops.reshape(patches, (-1, 9 * cin)), ops.reshape(kernel, (9 * cin, cout)))
    return ops.reshape(out, (-1, h, w, cout))


def _taps(k0, k1, k2, odd: int):
    """The two taps a 3x3 kernel's three taps become along one axis after nearest x2
    upsampling: even outputs read input offsets (-1, 0), odd ones (0, +1)."""
    return (k0 + k1, k2) if odd else (k0, k1 + k2)


def upsample_conv3x3(x, kernel):
    """Nearest-neighbour x2 upsampling followed by a 3x3, stride-1, "same" convolution,
    computed at the input's resolution.

    Each of the four output phases (even or odd row and column) sees a 2x2 input
    neighbourhood, through a 2x2 kernel made of sums of the 3x3 kernel's taps (summed in
    float32, rounded once), so the work is four 2x2 convolutions of the input instead
    of one 3x3 convolution of the 4x larger upsampled tensor: 16 products per output
    block instead of 36, and no upsampled copy. Equals the two steps up to float
    rounding.

    Args:
        x: `[B, H, W, Cin]` with static H and W.
        kernel: `[3, 3, Cin, Cout]`.

    Returns:
        `[B, 2H, 2W, Cout]`.

    Example:
    >>> import numpy as np
    >>> x = np.random.default_rng(0).standard_normal((1, 3, 4, 2)).astype("float32")
    >>> k = np.random.default_rng(1).standard_normal((3, 3, 2, 5)).astype("float32")
    >>> up = np.repeat(np.repeat(x, 2, axis=1), 2, axis=2)
    >>> direct = keras.ops.conv(up, k, padding="same")
    >>> float(keras.ops.max(keras.ops.abs(upsample_conv3x3(x, k) - direct))) < 1e-4
    True
    """
    _, h, w, _ = x.shape
    cout = kernel.shape[-1]
    if h is None or w is None:
        raise ValueError(
            f"upsample_conv3x3: x must have static height and width; received shape "
            f"{tuple(x.shape)}."
        )
    xp = ops.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    k = ops.cast(kernel, "float32")
    rows = []
    for a in range(2):
        columns = []
        for b in range(2):
            k2x2 = [ops.stack(_taps(r[0], r[1], r[2], b)) for r in _taps(k[0], k[1], k[2], a)]
            window = xp[:, a : a + h + 1, b : b + w + 1]
            columns.append(ops.conv(window, ops.cast(ops.stack(k2x2), x.dtype), padding="valid"))
        rows.append(ops.stack(columns, axis=3))  # [B, H, W, 2, Cout]
    return ops.reshape(ops.stack(rows, axis=2), (-1, 2 * h, 2 * w, cout))  # [B, H, 2, W, 2, C]


def upsample_by_phases(x, compute_dtype) -> bool:
    """Whether `Upsample2D` computes input `x` by `upsample_conv3x3` ("auto" only; see
    `PHASE_UPSAMPLE_MIN_ROWS`).

    Example:
    >>> upsample_by_phases(keras.ops.ones((1, 4, 4, 8)), "bfloat16")
    False
    """
    n, h, w, _ = x.shape
    return (
        _conv_algorithm["value"] == "auto"
        and keras.backend.backend() == "tensorflow"
        and keras.backend.standardize_dtype(compute_dtype) != "float32"
        and None not in (n, h, w)
        and n * h * w >= PHASE_UPSAMPLE_MIN_ROWS
        and not backend.tracing_for_xla()
        and not backend.has_accelerator()
    )


@keras.saving.register_keras_serializable(package="keras_sd")
class Conv3x3(layers.Conv2D):
    """A 3x3, stride-1, "same" `keras.layers.Conv2D` that can compute by Winograd or GEMM.

    Same variables, names and results as `Conv2D(filters, 3, padding="same")`;
    `set_conv_algorithm` says when `winograd_conv3x3` or `gemm_conv3x3` replaces the
    backend's convolution (by default: Winograd under XLA on a CPU in float32 for large
    enough inputs, `WINOGRAD_MIN_TILES`; GEMM on a TensorFlow CPU outside XLA for large
    kernels on few positions, `GEMM_RULES`).

    Example:
    >>> conv = Conv3x3(4)
    >>> tuple(conv(keras.ops.ones((1, 8, 8, 2))).shape)
    (1, 8, 8, 4)
    """

    def __init__(self, filters: int, **kwargs):
        kwargs.setdefault("kernel_size", 3)
        kwargs.setdefault("padding", "same")
        super().__init__(filters, **kwargs)
        if (self.kernel_size, self.strides, self.padding) != ((3, 3), (1, 1), "same"):
            raise ValueError(
                "Conv3x3: kernel_size must be 3, strides 1 and padding 'same'; received "
                f"{self.kernel_size}, {self.strides}, {self.padding!r}."
            )

    def _algorithm(self, x) -> str:
        """Which of "winograd", "gemm" or "direct" computes input `x` (static shapes when
        compiled)."""
        algorithm = _conv_algorithm["value"]
        n, h, w, cin = x.shape
        if (
            algorithm == "direct"
            or self.dilation_rate != (1, 1)
            or self.groups != 1
            or self.data_format != "channels_last"
            or None in (n, h, w, cin)
        ):
            return "direct"
        even = h % 2 == 0 and w % 2 == 0
        if algorithm != "auto":
            return algorithm if algorithm == "gemm" or even else "direct"
        chosen = "direct"
        if backend.tracing_for_xla():
            tiles = n * (h // 2) * (w // 2)
            if even and self.compute_dtype == "float32" and tiles >= WINOGRAD_MIN_TILES:
                chosen = "winograd"
        elif keras.backend.backend() == "tensorflow":
            rows, kernel_bytes = n * h * w, 9 * cin * self.filters * _itemsize(x.dtype)
            if any(rows <= most and kernel_bytes >= least for most, least in GEMM_RULES):
                chosen = "gemm"
        # Both are tuned for CPUs. Asked last: most calls need not ask the device.
        return "direct" if chosen == "direct" or backend.has_accelerator() else chosen

    def convolution_op(self, inputs, kernel):
        # Keras' Conv2D.call adds the bias and activation around this.
        algorithm = self._algorithm(inputs)
        if algorithm == "direct":
            return super().convolution_op(inputs, kernel)
        compute = winograd_conv3x3 if algorithm == "winograd" else gemm_conv3x3
        return compute(inputs, ops.cast(kernel, inputs.dtype))

    def get_config(self):
        config = super().get_config()
        for fixed in ("kernel_size", "strides", "padding"):
            config.pop(fixed)
        return config
