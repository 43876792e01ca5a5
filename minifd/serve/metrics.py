"""The numbers `minifd serve` shows at GET /metrics, in Prometheus' text exposition format.

Counters: the requests answered (by endpoint and HTTP status), the prompt and completion tokens they
took. Gauges: the requests waiting for a batch slot, the sequences in the running batch, and the
decode rate of the running batch.

The numbers are kept by prometheus_client, the Prometheus project's own Python client, rather than by
a few lines of formatting here. The format is easy to write but easy to get subtly wrong (label
escaping, the _total suffix of counters, float spelling), and the numbers are written by the
scheduler's thread while the HTTP app's thread reads them: the client's metrics are safe to update
and render from several threads at once. It is one small pure-Python package with no dependencies.
"""

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, generate_latest


class Metrics:
    """One server's metrics. content_type: the Content-Type of what render() gives."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        # A registry of its own rather than the process-wide default, so that two servers (or two tests)
        # in one process keep separate counts.
        self.registry = CollectorRegistry()
        self.requests = Counter("minifd_requests", "HTTP requests answered, by endpoint and status.",
                                ["endpoint", "status"], registry=self.registry)
        self.prompt_tokens = Counter("minifd_prompt_tokens", "Prompt tokens of the completed requests.",
                                     registry=self.registry)
        self.completion_tokens = Counter("minifd_completion_tokens", "Tokens generated for the completed requests.",
                                         registry=self.registry)
        self.cancelled = Counter("minifd_cancelled_requests", "Requests whose client went away before the end.",
                                 registry=self.registry)
        self.queue_depth = Gauge("minifd_queue_depth", "Requests waiting for a batch slot.", registry=self.registry)
        self.batch_size = Gauge("minifd_running_batch_size", "Sequences in the running batch.", registry=self.registry)
        self.decode_rate = Gauge("minifd_decode_tokens_per_second",
                                 "Tokens the running batch generates per second, all its sequences together.",
                                 registry=self.registry)

    def count_request(self, endpoint, status):
        """One request to `endpoint` (its path) answered with HTTP `status`."""
        self.requests.labels(endpoint=endpoint, status=str(status)).inc()

    def count_usage(self, usage):
        """The tokens of one completed request (a protocol.Usage)."""
        self.prompt_tokens.inc(usage.prompt_tokens)
        self.completion_tokens.inc(usage.completion_tokens)

    def count_cancelled(self):
        """One request given up because its client disconnected."""
        self.cancelled.inc()

    def set_scheduler_state(self, queue_depth, batch_size, decode_tokens_per_second):
        """What the scheduler is doing now: requests waiting, sequences running, their decode rate."""
        self.queue_depth.set(queue_depth)
        self.batch_size.set(batch_size)
        self.decode_rate.set(decode_tokens_per_second)

    def render(self):
        """-> the text exposition of every metric, as bytes (UTF-8)."""
        return generate_latest(self.registry)
