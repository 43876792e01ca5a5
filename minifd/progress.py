"""A progress bar on stderr, drawn only for a terminal so logs and tests stay clean."""

import sys
import time


class ProgressBar:
    """delay: seconds of work before the bar first shows, so that work which ends sooner shows none."""

    def __init__(self, label, total, unit_scale=1.0, unit="", enabled=None, width=30, delay=0.0):
        self.label, self.total, self.unit_scale, self.unit, self.width = label, max(total, 1), unit_scale, unit, width
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.done = 0
        self._shown_from = time.monotonic() + delay
        self._last_draw = 0.0
        self._drawn = False

    def advance(self, amount):
        self.done += amount
        now = time.monotonic()
        if self.enabled and now >= self._shown_from and (now - self._last_draw > 0.1 or self.done >= self.total):
            self._last_draw = now
            self._drawn = True
            filled = int(self.width * self.done / self.total)
            bar = "#" * filled + "." * (self.width - filled)
            shown, total = self.done / self.unit_scale, self.total / self.unit_scale
            sys.stderr.write(f"\r{self.label} [{bar}] {shown:.0f}/{total:.0f} {self.unit}")
            sys.stderr.flush()

    def close(self):
        if self._drawn:
            sys.stderr.write("\n")
            sys.stderr.flush()
