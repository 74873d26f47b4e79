"""The command line: `icldaemon measure | migrate | db | run | submit | status | memories | runs | query |
learn | consolidate | adapters | generate | export | plot | roles`.

The only place errors become messages and exit codes.
"""

import argparse
import json
import signal
import sys
from pathlib import Path

from pydantic import ValidationError

from icldaemon.exceptions import BadInputError, IcldaemonError
from icldaemon.extras import require
from icldaemon.logs import configure_logging, get_logger
from icldaemon.settings import Settings, load_settings

EXIT_ERROR = 1
EXIT_USAGE = 2
MEASURE_PLAIN_FORWARD_REPEATS = 3  # warm plain passes timed by `measure` for its speed ratio
PRIORITY_RANGE = (-2**31, 2**31 - 1)  # PostgreSQL's integer, the type of prompts.priority
DESCRIPTION = (
    "Measure how far a language model's context moves its implicit weights, per layer and per context token, "
    "and attribute the effect to each retrieved memory; prompts, memories and results live in PostgreSQL "
    "(an embedded server unless ICLD_DATABASE_URL is set). `icldaemon COMMAND --help` explains a command."
)


def _read_text(path: str, what: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BadInputError(f"{what} file {path} does not exist") from None
    except OSError as exc:  # a directory, no permission
        raise BadInputError(f"{what} file {path} cannot be read: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise BadInputError(f"{what} file {path} is not valid UTF-8: {exc}") from exc


def _read_json(path: str, what: str):
    text = _read_text(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadInputError(f"{what} file {path} is not valid JSON: {exc}") from exc


def _read_prompt_source(args) -> dict:
    """{"text": ...} from --text-file or {"messages": ...} from --messages-file."""
    if not args.text_file:
        return {"messages": _read_json(args.messages_file, "messages")}
    return {"text": _read_text(args.text_file, "text")}


def _check_output(path: str | None, option: str) -> None:
    """Refuse, before any work, a file to write whose directory does not exist."""
    if path is not None and not Path(path).absolute().parent.is_dir():
        raise BadInputError(f"{option} {path}: the directory {Path(path).absolute().parent} does not exist")


def _read_memories(path: str | None):
    from icldaemon.engine.prompt import Memory

    if path is None:
        return []
    raw = _read_json(path, "memories")
    if not isinstance(raw, list):
        raise BadInputError(f"memories file {path} must hold a JSON list of {{\"id\", \"key\", \"content\"}} objects")
    memories = []
    for index, item in enumerate(raw):
        if not isinstance(item, dict) or not isinstance(item.get("content"), str):
            raise BadInputError(f"memory {index} in {path} has no string \"content\"")
        memories.append(Memory(content=item["content"], key=item.get("key"), id=item.get("id")))
    return memories


def _check_model_name(name: str | None) -> None:
    """Refuse a model name that cannot be loaded (ModelLoadError) before torch is imported, which takes seconds."""
    from icldaemon.engine.model_names import model_source

    if name is not None:  # None: the bundled model
        model_source(name)


def cmd_measure(args, settings: Settings) -> int:
    # the input and the model name are checked before torch is imported: a fault is named at once
    prompt_source = _read_prompt_source(args)
    memories = _read_memories(args.memories_file)
    _check_output(args.json, "--json")
    _check_output(args.plot, "--plot")
    if args.plot:
        require("matplotlib")
    _check_model_name(args.model or settings.model)

    from icldaemon.engine.adapters import max_positions
    from icldaemon.engine.loading import load_configured_model
    from icldaemon.engine.measure import measure
    from icldaemon.engine.prompt import build_prompt
    from icldaemon.report import summary_lines

    loaded = load_configured_model(settings, args.model)
    prompt = build_prompt(loaded.tokenizer, memories=memories, query_tokens=args.query_tokens,
                          max_tokens=max_positions(loaded.model), **prompt_source)
    log = get_logger(model=loaded.name)
    log.info("measure_started", tokens=len(prompt.input_ids), context_tokens=prompt.context_tokens,
             memories=len(memories), stride=args.stride)
    # a one-off process is cold: warm the model up first, and time the plain pass as the best of three
    measurement = measure(loaded.model, prompt, stride=args.stride, model_name=loaded.name, warm_up=True,
                          plain_forward_repeats=MEASURE_PLAIN_FORWARD_REPEATS)
    log.info("run_measured", tokens=len(prompt.input_ids), seconds=round(measurement.timings["measure_s"], 3),
             max_abs_logit_error=measurement.exactness["max_abs_logit_error"])
    print("\n".join(summary_lines(measurement)))
    if args.json:
        Path(args.json).write_text(json.dumps(measurement.to_json()), encoding="utf-8")
        print(f"wrote {args.json}")
    if args.plot:
        from icldaemon.plots import plot_measurement

        plot_measurement(measurement, args.plot, layers=args.layers)
        print(f"wrote {args.plot}")
    return 0


def cmd_migrate(args, settings: Settings) -> int:
    from icldaemon.store.database import database_url
    from icldaemon.store.migrate import current, upgrade

    with database_url(settings) as url:
        upgrade(url, args.revision)
        print(f"database at revision {current(url)}")
    return 0


class _Stopped(Exception):
    """SIGINT or SIGTERM arrived."""


def _raise_stopped(signum, frame):
    raise _Stopped(signal.Signals(signum).name)


def cmd_db(args, settings: Settings) -> int:
    """The embedded database held up until SIGINT or SIGTERM, its URL on stdout; a configured one checked."""
    from icldaemon.store.database import database_url, libpq_url, psql_command
    from icldaemon.store.migrate import current, require_head, upgrade

    if settings.database_url:
        # a configured server is up on its own: check it and say where it is
        with database_url(settings) as url:
            require_head(url)
        print(libpq_url(url))
        print(f"icldaemon: ICLD_DATABASE_URL is set, and that server runs on its own: nothing to hold up; connect "
              f"with:\n    {psql_command()} \"{libpq_url(url)}\"", file=sys.stderr)
        return 0
    previous = {}  # the signal handlers before ours, put back at the end
    try:
        with database_url(settings) as url:
            if args.migrate:
                upgrade(url)
            revision = current(url) or "none: `icldaemon migrate` creates it"
            previous = {signum: signal.signal(signum, _raise_stopped) for signum in (signal.SIGINT, signal.SIGTERM)}
            try:
                print(libpq_url(url), flush=True)
                print(f"icldaemon: the embedded database in {settings.pgdata_dir} (schema revision {revision}) is up "
                      f"until Ctrl-C or SIGTERM; connect from another terminal with:\n"
                      f"    {psql_command()} \"{libpq_url(url)}\"", file=sys.stderr, flush=True)
                while True:
                    signal.pause()
            except _Stopped as stopped:
                for signum in previous:  # a second signal does not interrupt the shutdown
                    signal.signal(signum, signal.SIG_IGN)
                print(f"icldaemon: {stopped}: releasing the embedded database (it stops once no other command uses "
                      "it)", file=sys.stderr, flush=True)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 0


def cmd_run(args, settings: Settings) -> int:
    from icldaemon.store.database import database_url
    from icldaemon.store.migrate import require_head, upgrade

    with database_url(settings) as url:
        # the database and the model name are checked before torch is imported and the model loads
        if args.migrate:
            upgrade(url)
        else:
            require_head(url)
        _check_model_name(settings.model)

        from icldaemon.consolidate import ConsolidationSettings
        from icldaemon.engine.loading import check_measurable, load_configured_model
        from icldaemon.service import Service

        loaded = load_configured_model(settings)
        # before any prompt is claimed: a model the engine cannot measure must not fail the queue's jobs
        get_logger().info("model_checked", model=loaded.name, max_abs_logit_error=check_measurable(loaded))
        processed: list[int] = []  # with --once: the prompts this worker measured or failed, for their run ids
        service = Service.from_settings(url, loaded, settings, worker_id=args.worker_id, stride=args.stride,
                                        consolidation=ConsolidationSettings(), adapters_dir=settings.adapters_dir,
                                        on_processed=(lambda prompt_id, status: processed.append(prompt_id))
                                        if args.once else None)
        if args.once:
            counts = service.run_once()
            print(", ".join(f"{count} {status}" for status, count in sorted(counts.items())) or "nothing to do")
            _print_runs_of(url, processed)
            return 0
        return service.run_forever()


def _print_runs_of(url: str, prompt_ids: list[int]) -> None:
    """The measurement runs of the prompts just processed, on stderr (stdout keeps the counts alone)."""
    from icldaemon.store import queue
    from icldaemon.store.memories import runs_of_prompts

    if not prompt_ids:
        return
    with queue.connect(url) as connection:
        runs = runs_of_prompts(connection, prompt_ids)
    if runs:
        listed = ", ".join(f"run {run_id} (prompt {prompt_id})" for prompt_id, run_id in sorted(runs.items()))
        print(f"measured: {listed}; `icldaemon plot RUN_ID` draws one", file=sys.stderr)


def _comma_separated_ints(what: str, example: str):
    """An argparse type for a list like `example`; a bad value is named with `what` and the example."""

    def parse(value: str) -> list[int]:
        try:
            return [int(part) for part in value.split(",") if part.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {what} like {example}, got {value!r}") from None

    return parse


_memory_ids = _comma_separated_ints("memory ids", "1,2,3")
_layers = _comma_separated_ints("layer indices", "0,5,29")


def _whole_number_at_least(minimum: int, why: str = ""):
    """An argparse type for a count such as --limit or --stride; `why` explains the minimum."""

    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            number = minimum - 1
        if number < minimum:
            raise argparse.ArgumentTypeError(f"expected a whole number of at least {minimum}{why}, got {value!r}")
        return number

    return parse


_at_least_one = _whole_number_at_least(1)


def _positive_number(value: str) -> float:
    """An argparse type for --ridge."""
    try:
        number = float(value)
    except ValueError:
        number = 0.0
    if not number > 0 or number == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value!r}")
    return number


def _priority(value: str) -> int:
    """An argparse type for --priority: a whole number that fits prompts.priority."""
    lowest, highest = PRIORITY_RANGE
    try:
        number = int(value)
    except ValueError:
        number = None
    if number is None or not lowest <= number <= highest:
        raise argparse.ArgumentTypeError(f"expected a whole number from {lowest} to {highest} (PostgreSQL's integer), "
                                         f"got {value!r}")
    return number


def _non_negative_number(value: str) -> float:
    """An argparse type for --preservation and --focus."""
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if not 0 <= number < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number of at least 0, got {value!r}")
    return number


def cmd_submit(args, settings: Settings) -> int:
    from icldaemon.store import queue
    from icldaemon.store.database import database_url

    source = _read_prompt_source(args)
    with database_url(settings) as url, queue.connect(url) as connection:
        prompt_id = queue.submit(connection, memory_ids=args.memory_ids, session_id=args.session_id,
                                 priority=args.priority, **source)
    print(prompt_id)
    return 0


def cmd_status(args, settings: Settings) -> int:
    from icldaemon.store import queue
    from icldaemon.store.database import database_url

    with database_url(settings) as url, queue.connect(url) as connection:
        counts = queue.queue_counts(connection)
        errors = queue.last_errors(connection, args.errors)
    for status in ("queued", "running", "done", "failed"):
        print(f"{status:>8}  {counts.get(status, 0)}")
    if errors:
        print("last errors:")
        for error in errors:
            print(f"  prompt {error['id']} ({error['status']}, attempt {error['attempts']}, "
                  f"{error['at']:%Y-%m-%d %H:%M:%S}): {error['last_error']}")
    return 0


CONTENT_WIDTH = 60  # characters of a memory's content shown by `memories list`


def _on_the_database(settings: Settings, work, *arguments):
    """`work(connection, *arguments)` on a connection to the configured (or embedded) database."""
    from icldaemon.store import queue
    from icldaemon.store.database import database_url

    with database_url(settings) as url, queue.connect(url) as connection:
        return work(connection, *arguments)


def cmd_memories_add(args, settings: Settings) -> int:
    from icldaemon.store.memories import upsert_memory

    upserted = _on_the_database(settings, upsert_memory, args.key, args.content)
    print(upserted.memory_id)
    print(f"memory {upserted.memory_id} ({args.key!r}) {upserted.outcome}", file=sys.stderr)
    return 0


def cmd_memories_list(args, settings: Settings) -> int:
    from icldaemon.store.memories import list_memories

    rows = _on_the_database(settings, list_memories, args.limit)
    if not rows:
        print("no memories yet (add one with `icldaemon memories add --key K --content C`)")
        return 0
    key_width = max(3, *(len(row["key"] or "") for row in rows))
    print(f"{'id':>6}  {'key':<{key_width}}  {'retrieved':>9} {'measured':>8}  content")
    for row in rows:
        content = " ".join(row["content"].split())
        if len(content) > CONTENT_WIDTH:
            content = content[:CONTENT_WIDTH - 3] + "..."
        print(f"{row['id']:>6}  {row['key'] or '':<{key_width}}  {row['retrievals']:>9} {row['measured']:>8}  "
              f"{content}")
    if rows[0]["total"] > len(rows):
        print(f"the first {len(rows)} of {rows[0]['total']} memories; --limit shows more")
    return 0


def cmd_runs(args, settings: Settings) -> int:
    from icldaemon.store.memories import recent_runs

    rows = _on_the_database(settings, recent_runs, args.limit)
    if not rows:
        print("no measurement runs yet (`icldaemon run --once` measures the queued prompts)")
        return 0
    print(f"{'run':>6} {'prompt':>6}  {'session':<36}  {'tokens':>6} {'context':>7} {'memories':>8}  "
          f"{'max |logit err|':>15} {'seconds':>8} {'x forward':>9}  measured at")
    for row in rows:
        error = "-" if row["max_abs_logit_error"] is None else f"{row['max_abs_logit_error']:.2e}"
        seconds = "-" if row["measure_s"] is None else f"{row['measure_s']:.2f}"
        ratio = ("-" if row["measure_s"] is None or not row["plain_forward_s"]
                 else f"{row['measure_s'] / row['plain_forward_s']:.1f}")
        print(f"{row['run_id']:>6} {row['prompt_id']:>6}  {str(row['session_id'] or '-'):<36}  "
              f"{row['total_tokens']:>6} {row['context_tokens']:>7} {row['memories']:>8}  {error:>15} "
              f"{seconds:>8} {ratio:>9}  {row['created_at']:%Y-%m-%d %H:%M:%S}")
    return 0


def _variable(text: str) -> tuple[str, str]:
    name, equals, value = text.partition("=")
    if not equals or not name:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=VALUE")
    return name, value


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def cmd_query(args, settings: Settings) -> int:
    import csv

    from icldaemon.store.analytics import analytics_queries, checked_query, run_analytics_query

    if args.name is None:
        for name, variables in analytics_queries().items():
            print(f"{name}  {' '.join(f'-v {variable}=...' for variable in variables)}".rstrip())
        return 0
    values = dict(args.variables or [])
    checked_query(args.name, values)  # before connecting: a wrong name or variable needs no database
    result = _on_the_database(settings, run_analytics_query, args.name, values)
    if args.csv:
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(result.columns)
        writer.writerows([["" if value is None else value for value in row] for row in result.rows])
        return 0
    cells = [[_cell(value) for value in row] for row in result.rows]
    widths = [max(len(column), *(len(row[index]) for row in cells)) for index, column in enumerate(result.columns)]
    print("  ".join(column.ljust(width) for column, width in zip(result.columns, widths, strict=True)).rstrip())
    for row in cells:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    print(f"({len(cells)} row{'s' if len(cells) != 1 else ''})", file=sys.stderr)
    return 0


def cmd_learn(args, settings: Settings) -> int:
    from icldaemon import learn
    from icldaemon.store import queue
    from icldaemon.store.database import database_url
    from icldaemon.store.migrate import require_head

    if args.consolidate and settings.answer_tokens == 0:
        raise BadInputError("--consolidate fits the answer patches, and ICLD_ANSWER_TOKENS=0 records none")
    with database_url(settings) as url:
        require_head(url)
        if args.consolidate:  # before anything is queued: a model that cannot load leaves no questions behind
            _check_model_name(settings.model)
        with queue.connect(url) as connection:
            earlier = learn.earlier_prompts(connection, args.memory_id)
        prompt_ids = learn.learn_memory(url, args.memory_id, args.questions)
        print("\n".join(map(str, prompt_ids)))
        session = learn.session_id(args.memory_id)
        print(f"memory {args.memory_id}: {len(prompt_ids)} questions queued in session {session}"
              + (f" (learned before: {earlier} earlier prompts in it)" if earlier else ""), file=sys.stderr)
        if not args.consolidate:
            return 0

        from icldaemon.consolidate import ConsolidationRequest, ConsolidationSettings, Consolidator, describe
        from icldaemon.engine.loading import check_measurable, load_configured_model
        from icldaemon.service import Service

        loaded = load_configured_model(settings)
        get_logger().info("model_checked", model=loaded.name, max_abs_logit_error=check_measurable(loaded))
        # the queue drained as `icldaemon run --once` does, with whatever else was queued
        counts = Service.from_settings(url, loaded, settings).run_once()
        print(", ".join(f"{count} {status}" for status, count in sorted(counts.items())) or "nothing to do",
              file=sys.stderr)
        consolidation = ConsolidationSettings()
        # the questions just measured are enough for a version, however high min_patches is set
        request = ConsolidationRequest.from_settings(consolidation, scope="memory", memory_id=args.memory_id,
                                                     min_patches=min(consolidation.min_patches, len(prompt_ids)))
        records = Consolidator(url, loaded, settings.adapters_dir).run(request)
    for record in records:
        print(describe(record))
    return 0


def cmd_consolidate(args, settings: Settings) -> int:
    from icldaemon.store.database import database_url
    from icldaemon.store.migrate import require_head

    # the numbers are checked by argparse; the database and the model name before torch is imported
    if args.method == "distillation":
        fit_options = (("--ridge", args.ridge), ("--preservation", args.preservation), ("--focus", args.focus),
                       ("--refinements", args.refinements))
        given = [option for option, value in fit_options if value is not None]
        if given:
            raise BadInputError(f"{', '.join(given)} belong to the down_projection fit; --method distillation trains "
                                "by gradient steps and takes none of them")
    with database_url(settings) as url:
        require_head(url)
        _check_model_name(settings.model)

        from icldaemon.consolidate import ConsolidationRequest, ConsolidationSettings, Consolidator, describe
        from icldaemon.engine.loading import load_configured_model

        request = ConsolidationRequest.from_settings(
            ConsolidationSettings(),
            scope=args.scope or ("memory" if args.memory_id is not None else
                                 "session" if args.session_id is not None else None),
            memory_id=args.memory_id, session_id=args.session_id, rank=args.rank, min_patches=args.min_patches,
            ridge=args.ridge, preservation=args.preservation, focus=args.focus, refinements=args.refinements,
            method=args.method,
        )
        loaded = load_configured_model(settings)
        records = Consolidator(url, loaded, settings.adapters_dir).run(request)
    for record in records:
        print(describe(record))
    if not records:
        print(f"no {request.scope} has {request.min_patches} new answer patches of {loaded.name} yet")
    return 0


def cmd_adapters(args, settings: Settings) -> int:
    from icldaemon.store import queue
    from icldaemon.store.adapters import list_adapters
    from icldaemon.store.database import database_url

    with database_url(settings) as url, queue.connect(url) as connection:
        rows = list_adapters(connection, args.limit)
    if not rows:
        print("no adapters yet")
        return 0

    def share(value, width=5):
        return "-".rjust(width) if value is None else f"{value:{width}.0%}"

    def nats(value):
        return "      -" if value is None else f"{value:7.4f}"

    print(f"{'id':>5}  {'scope':<20} {'v':>3} {'status':<9} {'mem':>4} {'rank':>4} {'fit':>4} {'held':>4}  "
          f"{'with':>5} {'w/o':>5} {'LoRA':>5}  {'neutral':>7} {'kept':>5} {'leak':>5}  path")
    for row in rows:
        status = row["status"] + ("*" if row["current"] else "")
        if row["method"] == "gate_up_bias":  # versions before schema revision 0006: only the figure they had
            figures = f"{'(' + row['method'] + ', recovered ' + share(row['recovered_all']).strip() + ')':<49}"
        else:
            figures = (f"{share(row['with_memory_rate'])} {share(row['without_memory_rate'])} "
                       f"{share(row['adapter_rate'])}  {nats(row['neutral_kl'])} "
                       f"{share(row['neutral_next_token_unchanged'])} {share(row['leak_rate'])}")
        print(f"{row['id']:>5}  {row['scope_key']:<20} {row['version']:>3} {status:<9} {row['memories']:>4} "
              f"{row['rank']:>4} {row['patch_count']:>4} {row['held_out_count']:>4}  {figures}  {row['path']}")
        if row["status_reason"]:
            print(f"{'':>7}rejected: {row['status_reason']}")
    print("mem: the memories the version was fitted on; rank: for a group, the smallest keeping 90% of every "
          "layer's fit; with / w/o / LoRA: held-out answers naming the memory's fact with the memory in context, without it, without "
          "it but with the adapter; neutral: mean KL(base || adapted) at the next token of the shipped neutral prompts, "
          "nats; kept: their greedy next token unchanged; leak: irrelevant held-out questions answered with the fact; "
          "*: the current version (the newest accepted)")
    return 0


def cmd_generate(args, settings: Settings) -> int:
    import warnings

    from icldaemon.store import adapters, queue
    from icldaemon.store.database import database_url

    # the input, the adapter and the model name are checked before torch is imported
    source = _read_prompt_source(args)
    with database_url(settings) as url, queue.connect(url) as connection:
        row = adapters.adapter(connection, args.adapter)
    path = Path(row["path"])
    if not (path / "adapter_config.json").is_file():
        raise BadInputError(f"adapter {args.adapter}'s directory {path} holds no adapter_config.json (moved or deleted?)")
    _check_model_name(settings.model)

    from peft import PeftModel

    from icldaemon.engine.adapters import max_positions
    from icldaemon.engine.answers import greedy_answer, stop_token_ids
    from icldaemon.engine.loading import load_configured_model
    from icldaemon.engine.prompt import Memory, build_prompt

    loaded = load_configured_model(settings)
    if row["model"] != loaded.name:
        raise BadInputError(f"adapter {args.adapter} was fitted on {row['model']}; the loaded model is {loaded.name} "
                            "(set ICLD_MODEL)")
    memories = [Memory(content=memory["content"], key=memory["key"], id=memory["id"]) for memory in row["memories"]]
    limit = max_positions(loaded.model)
    with_memory = build_prompt(loaded.tokenizer, memories=memories, max_tokens=limit, **source).input_ids
    without = build_prompt(loaded.tokenizer, max_tokens=limit, **source).input_ids
    stop = stop_token_ids(loaded.model, loaded.tokenizer)
    decode = lambda ids: loaded.tokenizer.decode(ids, skip_special_tokens=True).strip()  # noqa: E731
    base = {name: decode(greedy_answer(loaded.model, ids, args.max_new_tokens, stop))
            for name, ids in (("with the memory in context", with_memory), ("without it", without))}
    with warnings.catch_warnings():
        # adapters written before the down-projection form carry lora_bias on layers without a bias
        warnings.filterwarnings("ignore", message=".*lora_bias.*")
        adapted = PeftModel.from_pretrained(loaded.model, str(path)).eval()
    base["without it, with the adapter"] = decode(greedy_answer(adapted, without, args.max_new_tokens, stop))
    keys = ", ".join(memory.key or str(memory.id) for memory in memories) or "none"
    print(f"adapter {row['id']} ({row['scope_key']} v{row['version']}, {row['method']}, {row['status']}); memories: {keys}")
    for name, text in base.items():
        print(f"\n{name}:\n  {text}")
    return 0


def cmd_export(args, settings: Settings) -> int:
    import time

    from icldaemon.engine.merge import check_adapter_dir, check_merge_target
    from icldaemon.store import adapters, queue
    from icldaemon.store.database import database_url

    # the target, the adapter and the model name are checked before torch is imported
    out_dir = Path(args.merged)
    check_merge_target(out_dir, "--merged")
    with database_url(settings) as url, queue.connect(url) as connection:
        row = adapters.adapter(connection, args.adapter)
    described = f"adapter {row['id']} ({row['scope_key']} v{row['version']})"
    if row["status"] != "accepted" and not args.allow_rejected:
        reason = f" ({row['status_reason']})" if row["status_reason"] else ""
        raise BadInputError(f"{described} was {row['status']} by the quality gate{reason}; --allow-rejected exports "
                            "it anyway")
    try:
        check_adapter_dir(Path(row["path"]))
    except BadInputError as exc:
        raise BadInputError(f"{described}: {exc}") from None
    _check_model_name(settings.model)

    from icldaemon.engine.loading import load_configured_model
    from icldaemon.engine.merge import merge_adapter

    loaded = load_configured_model(settings)
    if row["model"] != loaded.name:
        raise BadInputError(f"{described} was fitted on {row['model']}; the loaded model is {loaded.name} "
                            "(set ICLD_MODEL)")
    if row["model_revision"] != loaded.revision:
        raise BadInputError(f"{described} was fitted on the weights {row['model_revision'] or '(not recorded)'} of "
                            f"{row['model']}; the loaded weights are {loaded.revision}, and its change is exact only "
                            "for the weights it was fitted on")
    started = time.perf_counter()
    merge_adapter(loaded.model, Path(row["path"]), out_dir, loaded.tokenizer)
    get_logger(model=loaded.name).info(
        "adapter_merged", adapter_id=row["id"], scope_key=row["scope_key"], version=row["version"],
        status=row["status"], model_revision=loaded.revision, path=str(out_dir),
        seconds=round(time.perf_counter() - started, 2))
    print(out_dir)
    return 0


def cmd_plot(args, settings: Settings) -> int:
    require("matplotlib")
    from icldaemon.plots import plot_run
    from icldaemon.store import queue
    from icldaemon.store.database import database_url
    from icldaemon.store.runs import load_run

    out = args.out or f"run-{args.run_id}.png"
    _check_output(out, "--out")
    with database_url(settings) as url, queue.connect(url) as connection:
        run = load_run(connection, args.run_id)
    plot_run(run, out, layers=args.layers)
    print(f"wrote {out}")
    return 0


def cmd_roles(args, settings: Settings) -> int:
    from icldaemon.store.database import database_url
    from icldaemon.store.roles import ensure_roles

    names = {role: name for role, name in (("writer", args.writer), ("reader", args.reader),
                                           ("submitter", args.submitter)) if name}
    with database_url(settings) as url:
        report = ensure_roles(url, **names, retention_days=args.retention_days)
    print(f"writer role {report.writer}, read-only role {report.reader}, submitter role {report.submitter}: "
          "privileges granted")
    if args.retention_days is not None:
        print(f"retention of the log: {report.retention_days:g} days after a month ends")
    if report.public_create_revoked:
        print("revoked CREATE on schema public from PUBLIC (this database still granted it)")
    if report.created:
        print(f"created (the logins with no password yet): {', '.join(report.created)}")
    if report.tables_given_back:
        print(f"given back to the schema owner by {report.writer}: {', '.join(report.tables_given_back)}")
    return 0


def _invalid_configuration(exc: ValidationError) -> str:
    """One line: each invalid setting's own validator message (which names the variable), else pydantic's with the
    field and the value given."""
    problems = []
    for error in exc.errors(include_url=False):
        if error["type"] == "value_error":
            problems.append(str(error["ctx"]["error"]))
        else:
            field = ".".join(str(part) for part in error["loc"])
            problems.append(f"{field}: {error['msg']} (got {error['input']!r})")
    return f"invalid configuration: {'; '.join(problems)}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="icldaemon", description=DESCRIPTION)
    parser.add_argument("--log-format", choices=["json", "console", "auto"], help="overrides ICLD_LOG_FORMAT")
    commands = parser.add_subparsers(dest="command", required=True)

    measure = commands.add_parser("measure", help="measure one prompt, no database needed")
    measure.add_argument("--model", help="model directory or hub id (default: ICLD_MODEL, else the bundled SmolLM2)")
    source = measure.add_mutually_exclusive_group(required=True)
    source.add_argument("--text-file", help="a raw completion prompt")
    source.add_argument("--messages-file", help="a JSON chat: a list of {\"role\", \"content\"} objects")
    measure.add_argument("--memories-file", help="a JSON list of {\"id\", \"key\", \"content\"} memories")
    measure.add_argument("--query-tokens", type=_at_least_one, default=1,
                         help="trailing tokens that form the query (default 1)")
    measure.add_argument("--stride", type=_at_least_one, default=1,
                         help="measure every k-th prefix, and always the segment boundaries (default 1: every prefix)")
    measure.add_argument("--json", metavar="OUT", help="write the measurement as JSON")
    measure.add_argument("--plot", metavar="OUT.png", help="write per-token curves and a layer x token heatmap")
    measure.add_argument("--layers", type=_layers, help="layers to draw curves for in --plot: 0,5,29")
    measure.set_defaults(handler=cmd_measure)

    migrate = commands.add_parser("migrate", help="create or upgrade the schema (embedded database if none is set)")
    migrate.add_argument("--revision", default="head",
                         help="the Alembic revision to upgrade to, e.g. 0005 (default head: the newest)")
    migrate.set_defaults(handler=cmd_migrate)

    db = commands.add_parser(
        "db", help="hold up the embedded database for psql and other clients; prints its URL",
        description="Start the embedded database (or join the running one), upgrade its schema, print its URL on "
                    "stdout and keep it up until Ctrl-C or SIGTERM. With ICLD_DATABASE_URL set, check that database "
                    "and print its URL at once.")
    db.add_argument("--no-migrate", dest="migrate", action="store_false",
                    help="do not upgrade the embedded database's schema first")
    db.set_defaults(handler=cmd_db)

    run = commands.add_parser("run", help="the daemon: measure queued prompts and write the results")
    run.add_argument("--once", action="store_true", help="drain the queue and exit")
    run.add_argument("--worker-id", help="this worker's name in prompts.worker_id (default host:pid)")
    run.add_argument("--stride", type=_at_least_one, default=1,
                     help="measure every k-th prefix, and always the segment boundaries (default 1: every prefix)")
    run.add_argument("--no-migrate", dest="migrate", action="store_false",
                     help="do not upgrade the schema before starting")
    run.set_defaults(handler=cmd_run)

    submit = commands.add_parser("submit", help="queue a prompt with its retrieved memories; prints its id")
    source = submit.add_mutually_exclusive_group(required=True)
    source.add_argument("--text-file", help="a raw completion prompt")
    source.add_argument("--messages-file", help="a JSON chat: a list of {\"role\", \"content\"} objects")
    submit.add_argument("--memory-ids", type=_memory_ids, default=[], help="retrieved memories in rank order: 3,1,2")
    submit.add_argument("--session-id", help="a UUID grouping the prompts of one conversation")
    submit.add_argument("--priority", type=_priority, default=0, help="higher is measured first (default 0)")
    submit.set_defaults(handler=cmd_submit)

    status = commands.add_parser("status", help="queue counts by status and the last errors")
    status.add_argument("--errors", type=_whole_number_at_least(0), default=5,
                        help="how many recent errors to show (default 5)")
    status.set_defaults(handler=cmd_status)

    memories = commands.add_parser("memories", help="add or update a memory by key, or list the memories")
    memory_commands = memories.add_subparsers(dest="memories_command", required=True)
    memories_add = memory_commands.add_parser(
        "add", help="set the content of the (lowest-id) memory with this key, or add one; prints its id")
    memories_add.add_argument("--key", required=True, help="the memory's key, e.g. \"pet\"")
    memories_add.add_argument("--content", required=True, help="the memory's text, as it is put into prompts")
    memories_add.set_defaults(handler=cmd_memories_add)
    memories_list = memory_commands.add_parser("list", help="the memories by id, with how often each was used")
    memories_list.add_argument("--limit", type=_at_least_one, default=100, help="how many, by id (default 100)")
    memories_list.set_defaults(handler=cmd_memories_list)

    runs = commands.add_parser("runs", help="the newest measurement runs: ids for `icldaemon plot`, exactness, cost")
    runs.add_argument("--limit", type=_at_least_one, default=20, help="how many, newest first (default 20)")
    runs.set_defaults(handler=cmd_runs)

    query = commands.add_parser(
        "query", help="run a named analytics query of sql/ and print its rows (no name: list the queries)",
        description="Run one of the analytics queries of sql/ (the same text psql runs with -f) with its variables "
                    "bound, e.g. `icldaemon query saturation_by_layer -v model=SmolLM2-135M-Instruct -v "
                    "since=2026-11-01`. Without a name, list the queries and the variables each needs.")
    query.add_argument("name", nargs="?", help="the query's name (as in its file's `-- name: ... --` header)")
    query.add_argument("-v", dest="variables", metavar="NAME=VALUE", type=_variable, action="append",
                       help="a variable of the query, as psql's -v takes it (repeat for each)")
    query.add_argument("--csv", action="store_true", help="CSV with a header row instead of a table")
    query.set_defaults(handler=cmd_query)

    learn = commands.add_parser(
        "learn", help="queue questions about a memory, to consolidate it before anyone asks; prints the prompt ids",
        description="Queue chats that ask about one memory (direct, terse, indirect and task questions written from "
                    "templates over its key, none holding its content's words), each retrieving it at rank 1 and up "
                    "to two other memories of its submitter at ranks 2-3, in the memory's own learn session. With "
                    "--consolidate, also measure the queue (as `run --once`) and fit the memory's adapter (as "
                    "`consolidate --memory-id`).")
    learn.add_argument("--memory-id", type=int, required=True, help="the memory to learn (memories.id)")
    learn.add_argument("--questions", type=_whole_number_at_least(2), default=16,
                       help="how many questions to queue, at most the number of templates (default 16)")
    learn.add_argument("--consolidate", action="store_true",
                       help="then measure the queued prompts and consolidate the memory into an adapter")
    learn.set_defaults(handler=cmd_learn)

    consolidate = commands.add_parser(
        "consolidate", help="fit the stored answer patches of memories (or sessions) into PEFT LoRA adapters")
    consolidate.add_argument("--memory-id", type=int,
                             help="only this memory (default: every memory with enough new retrievals)")
    consolidate.add_argument("--session-id", help="only this session (a UUID)")
    consolidate.add_argument("--scope", choices=["memory", "session", "all"],
                             help="what one adapter covers (default: ICLD_CONSOLIDATE_SCOPE, else memory)")
    consolidate.add_argument("--rank", type=_at_least_one,
                             help="LoRA rank; lowered, with a warning, where there are fewer (retrieval, answer "
                                  "position) pairs to fit (default: ICLD_CONSOLIDATE_RANK, else 8)")
    consolidate.add_argument("--min-patches", type=_whole_number_at_least(2, " (one retrieval to fit, one held out)"),
                             help="new retrievals a group needs (default: ICLD_CONSOLIDATE_MIN_PATCHES, else 8)")
    consolidate.add_argument("--ridge", type=_positive_number,
                             help="ridge lambda as a share of the mean squared key norm (default: "
                                  "ICLD_CONSOLIDATE_RIDGE, else 0.05)")
    consolidate.add_argument("--preservation", type=_non_negative_number,
                             help="weight of the shipped generic prompts against the retrievals in the fit (default: "
                                  "ICLD_CONSOLIDATE_PRESERVATION, else 5.0)")
    consolidate.add_argument("--focus", type=_non_negative_number,
                             help="answer positions weighted by 1 + focus x how much the memory raises their token, "
                                  "in nats; 0: every position alike (default: ICLD_CONSOLIDATE_FOCUS, else 1.0)")
    consolidate.add_argument("--refinements", type=_whole_number_at_least(0),
                             help="refits on the keys the adapted model itself produces, each one more pass over the "
                                  "fitted retrievals; 0: the exact patches' keys only (default: "
                                  "ICLD_CONSOLIDATE_REFINEMENTS, else 2)")
    consolidate.add_argument("--method", choices=["down_projection", "distillation"], default="down_projection",
                             help="down_projection: the exact patches fitted (the default); distillation: the "
                                  "baseline, a LoRA of the same form trained by gradient steps on the same retrievals' "
                                  "answers (minutes to hours on a CPU; this command only, not the daemon's schedule)")
    consolidate.set_defaults(handler=cmd_consolidate)

    adapters = commands.add_parser("adapters", help="list the adapter versions with their status and figures")
    adapters.add_argument("--limit", type=_at_least_one, default=50, help="how many, newest first (default 50)")
    adapters.set_defaults(handler=cmd_adapters)

    generate = commands.add_parser(
        "generate", help="an adapter tried out: the continuation with its memories in context, without, and with it")
    generate.add_argument("--adapter", type=int, required=True, help="adapters.id (see `icldaemon adapters`)")
    prompt_source = generate.add_mutually_exclusive_group(required=True)
    prompt_source.add_argument("--messages-file", help="a JSON chat: a list of {\"role\", \"content\"} objects")
    prompt_source.add_argument("--text-file", help="a raw prompt")
    generate.add_argument("--max-new-tokens", type=_at_least_one, default=32,
                          help="greedy tokens to generate (default 32)")
    generate.set_defaults(handler=cmd_generate)

    export = commands.add_parser(
        "export", help="write the model with an adapter merged into its weights: a plain transformers checkpoint",
        description="Merge an adapter version into the weights of the model it was fitted on (ICLD_MODEL, the same "
                    "weights revision) and write the result as a plain transformers checkpoint (safetensors, config, "
                    "tokenizer) that loads without PEFT, for serving stacks that take no LoRA. The directory is "
                    "written under a temporary name and renamed into place.")
    export.add_argument("--adapter", type=int, required=True, help="adapters.id (see `icldaemon adapters`)")
    export.add_argument("--merged", required=True, metavar="DIR", help="a new (or empty) directory to write")
    export.add_argument("--allow-rejected", action="store_true",
                        help="export a version the quality gate rejected (default: accepted versions only)")
    export.set_defaults(handler=cmd_export)

    plot = commands.add_parser("plot", help="draw a measured run from the database: per-token curves and a heatmap")
    plot.add_argument("run_id", type=int, help="measurement_runs.id")
    plot.add_argument("--out", metavar="OUT.png", help="where to write the PNG (default run-RUN_ID.png)")
    plot.add_argument("--layers", type=_layers, help="layers to draw curves for: 0,5,29 (default: five spread out)")
    plot.set_defaults(handler=cmd_plot)

    roles = commands.add_parser("roles", help="create the writer, read-only and submitter database roles and grant them")
    roles.add_argument("--writer", help="the daemon's role (default icldaemon_writer)")
    roles.add_argument("--reader", help="the read-only role for Grafana and analysts, without the raw text of prompts "
                       "and memories (default icldaemon_reader; icldaemon_text_reader, granted to a login, adds it)")
    roles.add_argument("--submitter", help="the applications' role: submit prompts and memories, read the status of "
                       "their own prompts (default icldaemon_submitter)")
    roles.add_argument("--retention-days", type=float, metavar="DAYS",
                       help="the log's retention, which only the schema owner sets: a monthly partition is dropped "
                       "this many days after its month ends (default: leave it as it is; a new database keeps all)")
    roles.set_defaults(handler=cmd_roles)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings(log_format=args.log_format)
    except ValidationError as exc:
        print(f"icldaemon: {_invalid_configuration(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except ValueError as exc:  # pydantic-settings' own, a value it could not read at all
        print(f"icldaemon: invalid configuration: {exc}", file=sys.stderr)
        return EXIT_USAGE
    configure_logging(settings.log_format, settings.log_level)
    try:
        return args.handler(args, settings)
    except ValidationError as exc:  # a setting read by a command (ICLD_POLL_INTERVAL, ICLD_CONSOLIDATE_RANK, ...)
        print(f"icldaemon: {_invalid_configuration(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except IcldaemonError as exc:
        print(f"icldaemon: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
