"""Typed RunPod errors: each says what happened and carries a one-line fix in ``hint``."""

from __future__ import annotations

from collections.abc import Sequence

from ...errors import EXIT_NOT_FOUND, EXIT_PROVIDER, EXIT_USAGE, TrainctlError

API_KEY_HOME = "~/.runpod/config.toml"


class RunPodError(TrainctlError):
    """Base of every RunPod failure trainctl expects: RunPod refused or could not serve the
    request, unless the subclass says the request itself was wrong."""

    exit_code = EXIT_PROVIDER


class NoApiKeyError(RunPodError, PermissionError):
    exit_code = EXIT_USAGE

    def __init__(self) -> None:
        super().__init__(
            "No RunPod API key: RUNPOD_API_KEY is not set and ~/.runpod/config.toml has no "
            "[default] api_key.",
            "Create a key at https://console.runpod.io/user/settings, then export "
            "RUNPOD_API_KEY=... or run: runpod config (it writes ~/.runpod/config.toml)")


class ApiKeyRejectedError(RunPodError, PermissionError):

    def __init__(self, source: str) -> None:
        super().__init__(f"RunPod rejected the API key from {source} (HTTP 401).",
                         "Check or replace the key (https://console.runpod.io/user/settings); "
                         "RUNPOD_API_KEY wins over ~/.runpod/config.toml")
        self.source = source


class RunPodApiError(RunPodError, ConnectionError):
    """The API could not be reached, or answered with an error trainctl has no better name for."""

    def __init__(self, message: str, hint: str | None = None, *, operation: str = "",
                 retryable: bool = False) -> None:
        super().__init__(message, hint or "Retry in a minute; `trainctl runpod list` shows "
                                          "what exists on the account")
        self.operation = operation
        self.retryable = retryable


class AmbiguousCreateError(RunPodApiError):
    """A create request was sent but no answer came back: the pod may or may not exist."""


class InvalidPodRequestError(RunPodError, ValueError):
    """A launch request that can't be right (count, hours, disk, cloud, image, names)."""

    exit_code = EXIT_USAGE


class UnsafeEnvironmentError(RunPodError, ValueError):
    """A value that would reach the pod's environment in clear, or the user's own API key."""

    exit_code = EXIT_USAGE

    def __init__(self, name: str, message: str, hint: str) -> None:
        super().__init__(message, hint)
        self.name = name


class UnknownGpuTypeError(RunPodError, LookupError):
    exit_code = EXIT_USAGE

    def __init__(self, gpu: str, suggestions: Sequence[str]) -> None:
        near = f" Did you mean: {', '.join(repr(s) for s in suggestions)}?" if suggestions else ""
        super().__init__(f"Unknown RunPod GPU type {gpu!r}.{near}",
                         "List GPU types with: trainctl runpod gpus")
        self.gpu = gpu
        self.suggestions = list(suggestions)


class GpuUnavailableError(RunPodError, LookupError):
    """No capacity for this GPU type on this cloud and market; carries priced alternatives."""

    def __init__(self, what: str, alternatives: Sequence[str], *, detail: str = "") -> None:
        extra = f" ({detail})" if detail else ""
        hint = ("Try: " + "; ".join(alternatives)) if alternatives else \
            "Nothing comparable is available now; see: trainctl runpod gpus"
        super().__init__(f"No {what} available right now{extra}.", hint)
        self.what = what
        self.detail = detail
        self.alternatives = list(alternatives)


class BudgetExceededError(RunPodError, ValueError):
    exit_code = EXIT_USAGE

    def __init__(self, projected_usd: float, budget_usd: float, spent_usd: float,
                 hours_fit: float, price_hr: float, max_hours: float) -> None:
        spent = f" + ${spent_usd:.2f} already spent" if spent_usd else ""
        super().__init__(
            f"Projected cost ${projected_usd:.2f} ({max_hours:g} h x ${price_hr:.3f}/h){spent} "
            f"is over budget_usd ${budget_usd:.2f}.",
            f"Lower --max-hours to {hours_fit:.1f} or less, pick a cheaper GPU "
            "(trainctl runpod gpus), or raise [cloud] budget_usd in trainctl.toml")
        self.projected_usd = projected_usd
        self.budget_usd = budget_usd


class InsufficientBalanceError(RunPodError):
    def __init__(self, message: str, hint: str | None = None, *,
                 balance_usd: float | None = None, needed_usd: float | None = None) -> None:
        super().__init__(message, hint or "Add funds at https://console.runpod.io/user/billing, "
                                          "or end running pods (trainctl runpod list)")
        self.balance_usd = balance_usd
        self.needed_usd = needed_usd

    @classmethod
    def below_one_hour(cls, balance_usd: float, needed_usd: float,
                       detail: str) -> InsufficientBalanceError:
        return cls(f"RunPod balance ${balance_usd:.2f} is below one hour of spend "
                   f"(${needed_usd:.2f}: {detail}); RunPod does not start a pod without it.",
                   balance_usd=balance_usd, needed_usd=needed_usd)


class ImagePullError(RunPodError):
    def __init__(self, pod_id: str, image: str, detail: str, terminated: bool) -> None:
        end = " It was terminated." if terminated else ""
        super().__init__(f"Pod {pod_id} could not pull image {image!r}: {detail}.{end}",
                         f"Check the name and tag (docker pull {image}); a private image needs "
                         "registry credentials in RunPod, or pass --image with a public one")
        self.pod_id = pod_id
        self.image = image


class ProvisioningTimeoutError(RunPodError, TimeoutError):
    def __init__(self, pod_id: str, waited_s: float, terminated: bool, status: str = "") -> None:
        end = " it was terminated, nothing is left billing." if terminated else \
            f" terminating it failed: end it with: trainctl runpod terminate {pod_id}"
        last = f" (last status: {status})" if status else ""
        super().__init__(
            f"Pod {pod_id} was still provisioning after {waited_s / 60:.0f} min{last};" + end,
            "Try another GPU type or cloud (trainctl runpod gpus); a very large image may need "
            "a longer provisioning timeout")
        self.pod_id = pod_id
        self.terminated = terminated


class PodNotFoundError(RunPodError, LookupError):
    exit_code = EXIT_NOT_FOUND

    def __init__(self, pod_id: str) -> None:
        super().__init__(f"No RunPod pod {pod_id!r} on this account (terminated, or another "
                         "account's).", "List trainctl's pods with: trainctl runpod list")
        self.pod_id = pod_id
