"""A run's log file (``train.log``): what it records, and a full disk under it."""

from __future__ import annotations

import logging

from arcfold.logs import attach_file_log, detach_file_log


def test_a_log_file_on_a_full_disk_is_one_line_on_stderr_not_a_traceback_per_record(tmp_path, capsys):
    handler = attach_file_log(tmp_path / "train.log")
    handler.stream.close()
    handler.stream = open("/dev/full", "w", encoding="utf-8")  # every write fails: ENOSPC, as on a full disk
    try:
        for epoch in range(3):
            logging.getLogger("arcfold.training.fold").info("fold 0 epoch %d: loss 1.0", epoch)
    finally:
        detach_file_log(handler)
    assert capsys.readouterr().err == (
        f"arcfold: cannot write the log file {tmp_path / 'train.log'}: [Errno 28] No space left on device\n"
    )
