"""Many `icldaemon run` processes on one database: a few hundred prompts, each measured exactly once."""

from collections import Counter

from daemon_processes import (
    STARTUP_TIMEOUT,
    Daemon,
    RawPrompt,
    assert_each_measured_exactly_once,
    insert_prompts,
    terminate_all,
    wait_for_statuses,
)

DAEMONS = 8
PROMPTS = 300
BATCH = 50  # prompts committed together: the daemons are woken while others are busy


def test_concurrent_daemons_measure_every_prompt_exactly_once(database_url, tiny_model_dir, tmp_path):
    # a long lease: no prompt may be claimed twice here, however busy the machine
    daemons = [Daemon(database_url, tiny_model_dir, tmp_path / f"d{index}", f"d{index}", lease_seconds=120,
                      poll_interval=2) for index in range(DAEMONS)]
    try:
        for daemon in daemons:
            daemon.wait_for("listening", STARTUP_TIMEOUT)
        prompts = {}
        memories = (("pet", "A grey cat called Miso."), ("city", "Lisbon."))
        for start in range(0, PROMPTS, BATCH):
            prompts |= insert_prompts(database_url, [
                RawPrompt(f"prompt {index}: cheese => fromage, bread =>", memories[: index % 3])
                for index in range(start, start + BATCH)])
        wait_for_statuses(database_url, {"done": PROMPTS}, timeout=300)
        return_codes = terminate_all(daemons)
    finally:
        for daemon in daemons:
            daemon.close()

    assert return_codes == [0] * DAEMONS, [daemon.output() for daemon in daemons]
    attempts = assert_each_measured_exactly_once(database_url, prompts, num_layers=2)
    assert set(attempts.values()) == {1}
    measured_by = Counter()
    for daemon in daemons:
        for entry in daemon.events("run_measured"):
            measured_by[entry["prompt_id"]] += 1
    assert measured_by == Counter(dict.fromkeys(prompts, 1))
    per_daemon = [len(daemon.events("run_measured")) for daemon in daemons]
    assert min(per_daemon) > 0, per_daemon
