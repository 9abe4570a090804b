"""Loading a package: torch's ISA warning is dropped only for a package whose ISA this CPU extends."""

from __future__ import annotations

import logging

import pytest

# Imported first: its import sets up torch's loggers, which would drop the records of whichever
# case ran first (the test passed in the whole suite and failed alone).
import torch._inductor.config  # noqa: F401

from esper.aoti import isa_subset, no_isa_probe

LOGGER = "torch.export.pt2_archive._package"
FORMAT = "Device information mismatch for %s: %s vs %s. This could cause some issues."


@pytest.mark.parametrize(
    ("key", "here", "package", "shown"),
    [
        ("AOTI_CPU_ISA", "AVX512", "AVX2", False),  # an AVX2 package on an AVX-512 CPU: runs fine
        ("AOTI_CPU_ISA", "AVX2", "AVX512", True),  # the package needs more than this CPU has
        ("AOTI_CPU_ISA", "AVX512 AVX512_VNNI", "AVX2", False),  # torch's name for a VNNI CPU
        ("AOTI_CPU_ISA", "AVX512 AVX512_VNNI AMX_TILE", "AVX512", False),  # cpu-avx512 on an AMX CPU
        ("AOTI_CPU_ISA", "AVX512", "AVX512 AVX512_VNNI", True),  # built with VNNI, this CPU has none
        ("AOTI_CPU_ISA", "AVX2", "", True),  # nothing to compare: torch's to report
        ("AOTI_DEVICE_KEY", "AVX512", "AVX2", True),  # any other mismatch is torch's to report
    ],
)
def test_only_the_isa_subset_warning_is_dropped_while_loading(
    caplog: pytest.LogCaptureFixture, key: str, here: str, package: str, shown: bool
) -> None:
    log = logging.getLogger(LOGGER)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        with no_isa_probe():
            log.warning(FORMAT, key, here, package)
        assert (len(caplog.records) == 1) is shown
        caplog.clear()
        log.warning(FORMAT, key, here, package)  # outside a load, torch's logger is untouched
        assert len(caplog.records) == 1


@pytest.mark.parametrize(
    ("package", "here", "subset"),
    [
        ("avx2", "avx512", True),  # names as inductor's VecISA.__str__ gives them
        ("AVX512", "AVX512 AVX512_VNNI", True),
        ("AVX512 AVX512_VNNI", "AVX512 AVX512_VNNI AMX_TILE", True),
        ("AVX512", "AVX2", False),
        ("AVX512 AVX512_VNNI", "AVX512", False),
        ("", "AVX512", False),
    ],
)
def test_isa_subset(package: str, here: str, subset: bool) -> None:
    assert isa_subset(package, here) is subset
