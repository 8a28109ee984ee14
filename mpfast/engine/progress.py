"""Progress bars of the engine: counted in videos, with rate and ETA (tqdm, on stderr)."""

from __future__ import annotations

import sys


def video_bar(total: int, desc: str, initial: int = 0):
    """A tqdm bar over ``total`` videos (shows videos/s and the time left)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="video", dynamic_ncols=True, file=sys.stderr)


def advance(bar, videos: int) -> None:
    """Moves ``bar`` on by ``videos``, never past its total (a bar may be None)."""
    if bar is not None:
        bar.update(max(0, min(videos, bar.total - bar.n)))
