"""Progress reports that suit where the output goes: a tqdm bar on a terminal, plain lines in a
log file (nohup, a batch scheduler, `> train.log`), where a bar's carriage-return redraws would
pile up into one endless line."""

import sys
import time

from tqdm import tqdm


class Progress:
    """Counts `total` units (training steps, sampling steps) from `initial`.

    On a terminal (stderr is a TTY) it draws a tqdm bar; otherwise it prints one plain line at
    the start, one every `every` units and one at the end, each with the count, the rate and
    the latest `update(..., **values)`. `enabled=False` prints nothing (e.g. ranks other than 0).
    """

    def __init__(self, total: int, *, initial: int = 0, every: int = 1, desc: str = "",
                 enabled: bool = True, stream=None):
        self.stream = stream if stream is not None else sys.stderr
        self.total, self.count, self.every, self.desc = total, initial, max(1, every), desc
        self.enabled = enabled
        self.values: dict[str, str] = {}
        self.bar = None
        self._start, self._start_count = time.perf_counter(), initial
        if not enabled:
            return
        if self.stream.isatty():
            self.bar = tqdm(total=total, initial=initial, desc=desc or None, file=self.stream,
                            dynamic_ncols=True)
        else:
            self._line("start")

    def update(self, n: int = 1, **values) -> None:
        """Advance by n units; `values` (e.g. loss=0.12) are shown formatted as given."""
        self.count += n
        self.values = {key: str(value) for key, value in values.items()}
        if self.bar is not None:
            self.bar.update(n)
            if values:
                self.bar.set_postfix(self.values)
        elif self.enabled and self.count % self.every < n:  # crossed a multiple of `every`
            self._line()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            self._line("end")
        self.enabled, self.bar = False, None

    def _line(self, event: str = "") -> None:
        elapsed = time.perf_counter() - self._start
        rate = (self.count - self._start_count) / elapsed if elapsed > 0 else 0.0
        parts = [self.desc or "progress", f"{self.count}/{self.total}"]
        if event != "start":
            parts.append(f"{rate:.2f}/s {elapsed:.0f}s")
        parts += [f"{key}={value}" for key, value in self.values.items()]
        if event:
            parts.append(event)
        print(" ".join(parts), file=self.stream, flush=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
