"""The heads of the accuracy benchmark: peers, the linear probe, and ablations of the motion head.

Every head maps frame embeddings ``[B, T, D]`` (and class embeddings ``[C, D]``) to logits
``[B, C]`` and is trained by :class:`mpfast.engine.Trainer` like the motion head. Peers are
the standard temporal heads put on frozen CLIP frame features, at the benchmark's width:

* ``transformer``: a temporal transformer (CLIP4Clip "seqTransf", ActionCLIP "Transf"):
  learned position embedding, two pre-norm encoder layers (MLP 4D), residual to the
  frames, mean over time.
* ``conv``: two Conv1d(k=3)-BatchNorm-ReLU layers over time (width 2D), mean over time
  (a TSM/temporal-conv head; the 19 k-parameter head of issue 11 at D = 32).
* ``lstm``, ``gru``: a recurrent layer (CLIP4Clip "seqLSTM"), residual, mean over time.
* ``xclip``: X-CLIP's parts that run on frame features: a one-layer multi-frame
  integration transformer (residual, mean over time) and its video-specific prompting
  (class embeddings attend to the frames; residual scale initialised to 0.1), scored by
  cosine against the class embeddings. X-CLIP's cross-frame communication works inside
  the image encoder, on patch tokens, which a feature cache does not hold.

Every peer reads per-video standardised frames (:class:`Standardised`: centred over time,
divided by their RMS over the video), the input that the motion head builds for itself:
the change between frames is a few per cent of a frozen CLIP embedding, and fed the raw
frames the conv and the recurrent heads stayed at chance on the order-dependent tasks
(direction: conv 0.27 raw, 0.98 standardised; LSTM 0.26 and 0.88). The raw-input forms
are kept as ``<peer>_raw`` to show that. Measured on this suite, a linear classifier on
the pooled video feature scored higher than the cosine against the class text embeddings
for the transformer, the conv and the recurrent heads, so they get the classifier (the
stricter comparison).

Ablations change one part of a fresh :class:`~mpfast.model.MotionCLIP`: they set the
zero-initialised scale of the part to zero and freeze it with the part's weights (or
change a config option), so the trainer sees only the remaining parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class FeatureHead(nn.Module):
    """What :class:`mpfast.engine.Trainer` needs of a model, for a head on cached features.

    Args:
        head: ``head(frames [B,T,D], class_features [C,D]) -> logits [B,C]``.
        class_features: ``{tuple(class names): [C, D]}``, the frozen text side's output.
    """

    def __init__(self, head: nn.Module, class_features: dict[tuple[str, ...], Tensor]):
        super().__init__()
        self.head = head
        self.class_features = class_features

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def encode_classes(self, class_names: Sequence[str]) -> Tensor:
        return self.class_features[tuple(class_names)]

    def forward_features(self, frames: Tensor, class_features: Tensor) -> Tensor:
        return self.head(frames, class_features)


def standardise(frames: Tensor) -> Tensor:
    """Frames ``[B, T, D]`` centred over time and divided by their RMS over the video.

    Zeros where the centred frames are exactly zero; there is no floor (unlike the motion
    head's), so the rounding residue of a static video is scaled up like any change. Every
    video of the benchmark moves.
    """
    centred = frames - frames.mean(dim=1, keepdim=True)
    return centred / centred.pow(2).mean(dim=(1, 2), keepdim=True).sqrt().clamp_min(torch.finfo(frames.dtype).tiny)


class Standardised(nn.Module):
    """Feeds a head per-video standardised frames (:func:`standardise`)."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head

    def forward(self, frames: Tensor, class_features: Tensor) -> Tensor:
        return self.head(standardise(frames), class_features)


class LinearProbe(nn.Module):
    """Logistic regression on mean-pooled frames."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, frames: Tensor, class_features: Tensor) -> Tensor:
        return self.fc(frames.mean(dim=1))


class Scorer(nn.Module):
    """Turns a pooled video feature ``[B, D]`` into logits: a linear classifier, or the
    cosine against the class embeddings times CLIP's logit scale (``logit_scale`` given)."""

    def __init__(self, dim: int, num_classes: int, logit_scale: float | None = None):
        super().__init__()
        self.fc = nn.Linear(dim, num_classes) if logit_scale is None else None
        self.logit_scale = logit_scale

    def forward(self, video: Tensor, class_features: Tensor) -> Tensor:
        if self.fc is not None:
            return self.fc(video)
        return self.logit_scale * F.normalize(video, dim=-1) @ F.normalize(class_features, dim=-1).T


class TemporalTransformer(nn.Module):
    def __init__(self, dim: int, num_classes: int, num_frames: int, num_heads: int, logit_scale: float | None = None,
                 layers: int = 2):
        super().__init__()
        self.position = nn.Parameter(torch.zeros(num_frames, dim))
        layer = nn.TransformerEncoderLayer(dim, num_heads, 4 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.score = Scorer(dim, num_classes, logit_scale)

    def forward(self, frames: Tensor, class_features: Tensor) -> Tensor:
        pooled = (frames + self.encoder(frames + self.position[: frames.shape[1]])).mean(dim=1)
        return self.score(pooled, class_features)


class TemporalConv(nn.Module):
    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        width = 2 * dim
        self.net = nn.Sequential(nn.Conv1d(dim, width, 3, padding=1), nn.BatchNorm1d(width), nn.ReLU(),
                                 nn.Conv1d(width, width, 3, padding=1), nn.BatchNorm1d(width), nn.ReLU())
        self.fc = nn.Linear(width, num_classes)

    def forward(self, frames: Tensor, class_features: Tensor) -> Tensor:
        return self.fc(self.net(frames.transpose(1, 2)).mean(dim=-1))


class Recurrent(nn.Module):
    def __init__(self, dim: int, num_classes: int, cell: type[nn.RNNBase], logit_scale: float | None = None):
        super().__init__()
        self.rnn = cell(dim, dim, batch_first=True)
        self.score = Scorer(dim, num_classes, logit_scale)

    def forward(self, frames: Tensor, class_features: Tensor) -> Tensor:
        return self.score((frames + self.rnn(frames)[0]).mean(dim=1), class_features)


class XCLIPHead(nn.Module):
    """Multi-frame integration transformer and video-specific prompting, on frame features."""

    def __init__(self, dim: int, num_frames: int, num_heads: int, logit_scale: float):
        super().__init__()
        self.position = nn.Parameter(torch.zeros(num_frames, dim))
        layer = nn.TransformerEncoderLayer(dim, num_heads, 4 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.integration = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.text_norm, self.frame_norm = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.prompt_attention = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.prompt_mlp = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.alpha = nn.Parameter(torch.full((dim,), 0.1))
        self.logit_scale = logit_scale

    def forward(self, frames: Tensor, class_features: Tensor) -> Tensor:
        tokens = frames + self.integration(frames + self.position[: frames.shape[1]])
        video = tokens.mean(dim=1)
        text = class_features.expand(frames.shape[0], -1, -1)
        memory = self.frame_norm(tokens)
        attended = self.prompt_attention(self.text_norm(text), memory, memory, need_weights=False)[0]
        attended = attended + self.prompt_mlp(attended)
        text = text + self.alpha * attended
        return self.logit_scale * torch.einsum("bd,bcd->bc", F.normalize(video, dim=-1), F.normalize(text, dim=-1))


PeerFactory = Callable[[int, int, int, int, float], nn.Module]  # (D, C, T, heads, logit scale) -> head

_RAW_PEERS: dict[str, PeerFactory] = {
    "transformer": lambda d, c, t, h, s: TemporalTransformer(d, c, t, h),
    "conv": lambda d, c, t, h, s: TemporalConv(d, c),
    "lstm": lambda d, c, t, h, s: Recurrent(d, c, nn.LSTM),
    "gru": lambda d, c, t, h, s: Recurrent(d, c, nn.GRU),
    "xclip": lambda d, c, t, h, s: XCLIPHead(d, t, h, s),
    # The cosine-scored forms of CLIP4Clip (not run by default; see the module docstring).
    "transformer_cosine": lambda d, c, t, h, s: TemporalTransformer(d, c, t, h, s),
    "lstm_cosine": lambda d, c, t, h, s: Recurrent(d, c, nn.LSTM, s),
}


def _standardised(factory: PeerFactory) -> PeerFactory:
    return lambda d, c, t, h, s: Standardised(factory(d, c, t, h, s))


PEERS: dict[str, PeerFactory] = {
    "linear_probe": lambda d, c, t, h, s: LinearProbe(d, c),
    **{name: _standardised(factory) for name, factory in _RAW_PEERS.items()},
    **{f"{name}_raw": factory for name, factory in _RAW_PEERS.items() if not name.endswith("_cosine")},
}


def _freeze(*modules_or_parameters) -> None:
    for part in modules_or_parameters:
        for parameter in part.parameters() if isinstance(part, nn.Module) else (part,):
            parameter.requires_grad_(False)


def _zero(*parameters: nn.Parameter) -> None:
    with torch.no_grad():
        for parameter in parameters:
            parameter.zero_()


def _no_motion(model) -> None:
    _zero(model.motion.up.weight)
    _freeze(model.motion.down, model.motion.state, model.motion.modulation, model.motion.up, model.motion.gate)
    if model.prompts is not None:  # the prompts read a motion descriptor that is now zero
        _freeze(model.prompts.fc1, model.prompts.fc2)


def _no_text_to_video(model) -> None:
    communication = model.communication
    _zero(communication.text_scale)
    _freeze(communication.text_scale, communication.text_query, communication.video_key_value, communication.text_out)
    if model.prompts is not None:
        _freeze(model.prompts)


def _no_video_to_text(model) -> None:
    communication = model.communication
    _zero(communication.video_scale)
    _freeze(communication.video_scale, communication.video_query, communication.text_key_value,
            communication.video_out)


def _no_state(model) -> None:
    _zero(model.motion.state.weight, model.motion.modulation.weight)
    _freeze(model.motion.state, model.motion.modulation)


def _no_content_scale(model) -> None:
    _zero(model.motion.content_scale)
    _freeze(model.motion.content_scale)


def _no_adapter(model) -> None:
    _zero(model.communication.adapter_scale)
    _freeze(model.communication.adapter_scale, model.communication.adapter)


# name -> (HeadConfig overrides, change applied to the fresh model)
ABLATIONS: dict[str, tuple[dict, Callable | None]] = {
    "no_motion_stream": ({}, _no_motion),
    "no_state": ({}, _no_state),
    "no_content_scale": ({}, _no_content_scale),
    "one_stride": ({"strides": (1,)}, None),
    "no_prompts": ({"num_prompts": 0}, None),
    "no_text_to_video": ({}, _no_text_to_video),
    "no_video_to_text": ({}, _no_video_to_text),
    "no_class_adapter": ({}, _no_adapter),
}
