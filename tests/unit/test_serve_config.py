"""Serve args, the shipped configs/serve.yaml, exposure rules and request checks (no Ray, no torch)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from diffray.errors import ConfigError, RequestError
from diffray.serve.config import Limits, check_exposure, default_size, is_loopback, load_serve_file, parse_args
from diffray.serve.schemas import (GenerateRequest, ImagesRequest, Job, decode_b64_image, generate_job, images_job,
                                   parse_size)

REPO = Path(__file__).resolve().parents[2]


def test_shipped_serve_yaml_loads_and_validates():
    http, app, args = load_serve_file(str(REPO / "configs" / "serve.yaml"))
    assert (REPO / "configs" / "serve.yaml").read_text().startswith("# serve run configs/serve.yaml")
    assert http["port"] == 8000 and is_loopback(http["host"])
    assert app == {"name": "diffray", "route_prefix": "/"}
    assert args.model == "builtin:tiny" and "canny" in args.controlnets
    check_exposure(args, http["host"])  # runs as-is: loopback, no keys needed


def test_overrides_reach_args_and_http_options():
    http, _, args = load_serve_file(str(REPO / "configs" / "serve.yaml"),
                                    ["http_options.port=8001", "generator.num_replicas=2", "limits.max_n=2"])
    assert http["port"] == 8001 and args.generator.num_replicas == 2 and args.limits.max_n == 2


@pytest.mark.parametrize("data,field", [
    ({"limits": {"max_n": 0}}, "limits.max_n"),
    ({"generator": {"autoscaling": {"min_replicas": 3, "max_replicas": 1}}}, "generator.autoscaling"),
    ({"generator": {"autoscaling": {"min_replicas": 1, "max_replicas": 2, "initial_replicas": 3}}},
     "generator.autoscaling"),
    ({"generator": {"autoscaling": {"look_back_period_s": 0}}}, "generator.autoscaling.look_back_period_s"),
    ({"batching": {"max_batch_size": "many"}}, "batching.max_batch_size"),
    ({"modle": "x"}, "modle"),
    ({"controlnets": {"canny": {"path": "x", "preprocess": "sobel"}}}, "controlnets.canny.preprocess"),
    ({"default_steps": 60, "limits": {"max_steps": 50}}, "default_steps"),
    ({"default_size": 1024, "limits": {"max_side": 512}}, "default_size"),
    ({"default_size": 100}, "default_size"),
    ({"default_size": 64, "limits": {"min_side": 128}}, "default_size"),
])
def test_bad_args_name_the_field(data, field):
    with pytest.raises(ConfigError) as err:
        parse_args(data)
    assert field in str(err.value)


@pytest.mark.parametrize("host,keys,allow,ok", [
    ("127.0.0.1", [], False, True), ("localhost", [], False, True), ("::1", [], False, True),
    ("0.0.0.0", [], False, False), ("10.0.0.5", [], False, False), (None, [], False, False),
    ("0.0.0.0", ["k"], False, True), ("0.0.0.0", [], True, True),
])
def test_exposed_without_keys_refuses(host, keys, allow, ok, monkeypatch):
    monkeypatch.delenv("DIFFRAY_API_KEYS", raising=False)
    args = parse_args({"auth": {"api_keys": keys, "allow_unauthenticated": allow}})
    if ok:
        check_exposure(args, host)
    else:
        with pytest.raises(ConfigError, match="auth.api_keys"):
            check_exposure(args, host)


def test_api_keys_from_environment(monkeypatch):
    monkeypatch.setenv("DIFFRAY_API_KEYS", "a, b,,a")
    args = parse_args({"auth": {"api_keys": ["c"]}})
    assert args.api_keys() == ["c", "a", "b"]
    check_exposure(args, "0.0.0.0")


def test_build_app_without_keys_and_no_serve_to_ask_refuses(monkeypatch):
    """No Serve instance to ask which host its proxy binds: unknown counts as exposed."""
    monkeypatch.delenv("DIFFRAY_API_KEYS", raising=False)
    from diffray.serve.app import build_app

    with pytest.raises(ConfigError, match="auth.api_keys"):
        build_app({})


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1"])
def test_no_config_field_can_name_the_host(host, monkeypatch):
    """The host comes from Serve only: `auth.host` (which once let a config claim loopback while the proxy
    bound 0.0.0.0) is refused as an unknown field, naming it."""
    monkeypatch.delenv("DIFFRAY_API_KEYS", raising=False)
    from diffray.serve.app import build_app

    with pytest.raises(ConfigError, match="auth.host"):
        build_app({"auth": {"host": host}})


def test_build_app_deployment_options():
    from diffray.serve.app import build_app, generator_options

    args = parse_args({"generator": {"max_queued_requests": 5, "autoscaling": {"max_replicas": 3}}})
    opts = generator_options(args)
    assert opts["max_queued_requests"] == 5 and opts["autoscaling_config"]["max_replicas"] == 3
    assert opts["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 0.0}
    placed = generator_options(parse_args({"generator": {"resources": {"A10G": 1}}}))["ray_actor_options"]
    assert placed == {"num_cpus": 1.0, "num_gpus": 0.0, "resources": {"A10G": 1.0}}
    assert "downscale_to_zero_delay_s" not in opts["autoscaling_config"]  # Serve's default: downscale_delay_s
    auto = {"min_replicas": 0, "max_replicas": 2, "downscale_to_zero_delay_s": 5, "look_back_period_s": 2,
            "metrics_interval_s": 0.5}
    opts = generator_options(parse_args({"generator": {"autoscaling": auto}}))
    from ray.serve.config import AutoscalingConfig

    serve_side = AutoscalingConfig(**opts["autoscaling_config"])  # Serve accepts every key as we pass it
    assert (serve_side.min_replicas, serve_side.initial_replicas, serve_side.downscale_to_zero_delay_s,
            serve_side.look_back_period_s, serve_side.metrics_interval_s) == (0, 0, 5, 2, 0.5)
    app = build_app({"auth": {"api_keys": ["k"]}})
    assert type(app).__name__ == "Application"


LIMITS = Limits(max_side=256, max_n=4, max_steps=50)


@pytest.mark.parametrize("size,want", [("64x64", (64, 64)), ("256x128", (256, 128)), (None, (64, 64))])
def test_parse_size(size, want):
    assert parse_size(size, 64, LIMITS) == want


@pytest.mark.parametrize("size", ["65x64", "64x", "x64", "1024x64", "0x0", "64X64", "64x64x64", "-64x64"])
def test_bad_size_names_size(size):
    with pytest.raises(RequestError) as err:
        parse_size(size, 64, LIMITS)
    assert err.value.param == "size" and err.value.status == 400


def test_images_job_maps_model_to_adapter():
    job = images_job(ImagesRequest(prompt="p", model="my-lora", n=2, size="64x128", seed=3), LIMITS, 64, 4)
    assert (job.width, job.height, job.n, job.seed, job.adapters) == (64, 128, 2, 3, (("my-lora", 1.0),))
    for base in (None, "base", "dall-e-2"):
        assert images_job(ImagesRequest(prompt="p", model=base), LIMITS, 64, 4).adapters == ()
    with pytest.raises(RequestError) as err:  # refused as `adapter: ""` is, never the base model in disguise
        images_job(ImagesRequest(prompt="p", model=""), LIMITS, 64, 4)
    assert err.value.param == "model"


@pytest.mark.parametrize("body,param", [
    ({"prompt": ""}, "prompt"), ({"prompt": "x", "n": 5}, "n"), ({"prompt": "x", "steps": 0}, "steps"),
    ({"prompt": "x", "steps": 51}, "steps"), ({"prompt": "x", "guidance": 31}, "guidance"),
    ({"prompt": "x", "width": 12}, "width"), ({"prompt": "x", "seed": -5}, "seed"),
    ({"prompt": "x", "adapter": "a", "adapters": [{"id": "b"}]}, "adapters"),
    ({"prompt": "x", "adapters": [{"id": "a"}, {"id": "a"}]}, "adapters"),
])
def test_generate_job_limits(body, param):
    with pytest.raises(RequestError) as err:
        generate_job(GenerateRequest(**body), LIMITS, 64, 4)
    assert err.value.param == param


def test_job_keys_group_compatible_requests():
    a = generate_job(GenerateRequest(prompt="x", adapters=[{"id": "b", "weight": 1}, {"id": "a", "weight": 1}]),
                     LIMITS, 64, 4)
    b = generate_job(GenerateRequest(prompt="y", seed=9, adapters=[{"id": "b", "weight": 1},
                                                                    {"id": "a", "weight": 1}]), LIMITS, 64, 4)
    c = generate_job(GenerateRequest(prompt="y", steps=5), LIMITS, 64, 4)
    assert a.adapter_key() == "a+b" and a.batch_key() == b.batch_key() != c.batch_key()
    assert Job(prompt="p", n=1, width=8, height=8, steps=1, guidance=1, seed=0).adapter_key() == ""


def test_a_request_without_guidance_gets_the_model_familys():
    assert generate_job(GenerateRequest(prompt="x"), LIMITS, 64, 4, 3.5).guidance == 3.5  # a Flux app's
    assert generate_job(GenerateRequest(prompt="x", guidance=2.0), LIMITS, 64, 4, 3.5).guidance == 2.0
    assert generate_job(GenerateRequest(prompt="x"), LIMITS, 64, 4).guidance == 7.5
    assert images_job(ImagesRequest(prompt="x"), LIMITS, 64, 4, 3.5).guidance == 3.5


def test_decode_b64_image_errors_name_param():
    import base64

    with pytest.raises(RequestError, match="base64") as err:
        decode_b64_image("%%%", "control.image", 10_000)
    assert err.value.param == "control.image"
    with pytest.raises(RequestError) as err:
        decode_b64_image(base64.b64encode(b"GIF89a nope").decode(), "control.raw_image", 10_000)
    assert err.value.param == "control.raw_image"


HOSTILE_TEXT = ["lone \ud800 surrogate", "\udfff", "nul \x00 byte", "bell \x07", "escape \x1b[31m", "del \x7f"]


@pytest.mark.parametrize("text", HOSTILE_TEXT)
@pytest.mark.parametrize("field", ["prompt", "negative_prompt", "adapter"])
def test_text_a_tokenizer_or_database_cannot_take_is_refused_naming_the_field(text, field):
    from pydantic import ValidationError

    body = {"prompt": "ok", field: text}
    with pytest.raises(ValidationError) as err:
        GenerateRequest(**body)
    assert err.value.errors()[0]["loc"] == (field,)


@pytest.mark.parametrize("text", ["tab\tnewline\nreturn\r", "émoji 😀 and ﬁ ligature", "<script>alert(1)</script>",
                                  "\u202eright-to-left", "\U0010ffff"])
def test_ordinary_unicode_text_is_kept_as_is(text):
    assert GenerateRequest(prompt=text).prompt == text


@pytest.mark.parametrize("body,field", [({"n": True}, "n"), ({"n": "2"}, "n"), ({"n": 2.0}, "n"),
                                        ({"steps": "4"}, "steps"), ({"seed": 1.5}, "seed"), ({"guidance": "7"}, "guidance"),
                                        ({"width": False}, "width")])
def test_types_are_exact(body, field):
    from pydantic import TypeAdapter, ValidationError

    with pytest.raises(ValidationError) as err:
        TypeAdapter(GenerateRequest).validate_python({"prompt": "x", **body})
    assert err.value.errors()[0]["loc"][0] == field


@pytest.mark.parametrize("control,param", [({"model": "canny", "image": ""}, "image"),
                                           ({"model": "canny", "raw_image": ""}, "raw_image")])
def test_empty_control_images_are_refused_by_the_schema(control, param):
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as err:
        GenerateRequest(prompt="x", control=control)
    assert err.value.errors()[0]["loc"] == ("control", param)


@pytest.mark.parametrize("size", ["64x64\n", "64x64 ", " 64x64", "６４x64", "64x64\x00"])
def test_size_must_match_whole(size):
    with pytest.raises(RequestError) as err:
        parse_size(size, 64, LIMITS)
    assert err.value.param == "size"


@pytest.mark.parametrize("data", ["", "data:", "data:image/png;base64,", "AAAA", "iVBORw0KGgo=", "R0lGODlh"])
def test_decode_b64_image_never_leaks_reprs(data):
    with pytest.raises(RequestError) as err:
        decode_b64_image(data, "control.image", 10_000)
    assert err.value.param == "control.image" and "0x" not in err.value.message and "<" not in err.value.message


def test_one_deployment_takes_the_generators_options():
    """`generator.in_ingress`: the app is the Ingress alone, sized and placed as the Generator would be."""
    from diffray.serve.app import build_app

    gen = {"in_ingress": True, "num_cpus": 2, "resources": {"A10G": 1}, "autoscaling": {"max_replicas": 3}}
    d = build_app({"generator": gen, "auth": {"api_keys": ["k"]}})._bound_deployment
    assert d.name == "Ingress" and d.init_args[0] is None  # no Generator handle: it draws itself
    assert d.ray_actor_options == {"num_cpus": 2.0, "num_gpus": 0.0, "resources": {"A10G": 1.0}}
    assert d._deployment_config.autoscaling_config.max_replicas == 3
    assert d.max_ongoing_requests == 256  # HTTP requests; the Generator's limits are checked by the replica
    two = build_app({"auth": {"api_keys": ["k"]}})._bound_deployment
    assert two.ray_actor_options == {"num_cpus": 0.5} and two.init_args[0] is not None


@pytest.mark.parametrize("args,native,want", [
    ({}, 512, 512), ({"limits": {"max_side": 1024}}, 1024, 1024),
    ({"default_size": 512}, 1024, 512),  # a configured default wins over the native size
    ({"default_size": 1024, "limits": {"max_side": 1024}}, 512, 1024),
    ({}, 1024, "limits.max_side"), ({"limits": {"max_side": 768}}, 1024, "limits.max_side"),
    ({"limits": {"min_side": 128}}, 64, "limits.min_side"),
])
def test_the_default_size_is_within_the_limits_or_refused_at_start(args, native, want):
    """A request that gives no size is drawn at the default, which passes the checks a given size does: an
    SDXL or Flux base (native 1024) under limits.max_side 512 is refused at start, naming the limit, never
    drawn at 1024 nor answered with a 400 naming a `width` the client did not send."""
    cfg = parse_args(args)
    if isinstance(want, int):
        assert default_size(cfg, native) == want
        assert parse_size(None, want, cfg.limits) == (want, want)
        assert generate_job(GenerateRequest(prompt="x"), cfg.limits, want, 4).width == want
        return
    with pytest.raises(ConfigError) as err:
        default_size(cfg, native)
    assert err.value.field == want and str(native) in str(err.value)


def test_a_local_model_above_max_side_is_refused_when_the_app_is_built(tiny_model_path):
    """`diffray serve` or `serve run` on a model in a local folder whose native size (64 here) is above
    limits.max_side stops before anything deploys, naming the limit (before, each Ingress replica failed at
    start, in a loop, with the error in the replica's log); a default_size within the limits serves it."""
    from diffray.serve.app import build_app

    args = {"model": tiny_model_path, "limits": {"max_side": 32}, "auth": {"api_keys": ["k"]}}
    with pytest.raises(ConfigError) as err:
        build_app(args)
    assert err.value.field == "limits.max_side" and "below the model's native size 64" in str(err.value)
    assert build_app({**args, "default_size": 32}) is not None
    assert build_app({**args, "limits": {"max_side": 64}}) is not None


def test_a_relative_feedback_path_is_pinned_where_the_config_is_read(tmp_path, monkeypatch, capsys):
    """Each Ray process has its own working directory: a relative feedback.path once meant one store to the
    replicas (their cwd) and another to `diffray feedback export` (the shell's). It is made absolute where the
    config is read, and the replicas, which parse the dumped args again in their own cwd, keep it."""
    from testkit.cli import diffray

    from diffray.serve.feedback import FeedbackRequest, feedback_record
    from diffray.serve.feedback_store import FeedbackStore

    config = tmp_path / "configs" / "serve.yaml"
    config.parent.mkdir()
    config.write_text("applications:\n  - name: diffray\n    import_path: diffray.serve.app:build_app\n"
                      "    args:\n      feedback: {path: ./feedback/feedback.db}\n")
    work, replica = tmp_path / "work", tmp_path / "replica"
    work.mkdir(), replica.mkdir()
    monkeypatch.chdir(work)
    args = load_serve_file(str(config))[2]
    assert args.feedback.path == str(work / "feedback" / "feedback.db")
    monkeypatch.chdir(replica)  # an Ingress replica: the dumped args, its own working directory
    served = parse_args(args.model_dump(mode="json")).feedback
    png = ("iVBORw0KGgoAAAANSUhEUgAAAAgAAAAICAIAAABLbSncAAAAEklEQVR4nGP4z8CAFWEXHbQSACj/P8Fu7N9hAAAAAElFTkSuQmCC")
    req = FeedbackRequest.model_validate({"prompt": "a red circle", "choice": "left",
                                          "images": [{"b64_json": png}, {"b64_json": png}]})
    FeedbackStore(served.path).add(feedback_record(req, Limits(), served, None))
    monkeypatch.chdir(work)
    code, text = diffray(["feedback", "export", tmp_path / "out.parquet", "--serve-config", config],
                         monkeypatch, capsys)
    assert code == 0 and "wrote 1 preference pairs" in text, text
    assert not (replica / "feedback").exists()


@pytest.mark.parametrize("feedback", [None, {}, {"path": "feedback.db"}])
def test_a_relative_feedback_path_in_a_ray_working_dir_copy_is_refused(tmp_path, monkeypatch, feedback):
    """In a runtime_env working_dir (Ray's per-deploy copy, the cwd of every process of the app) a relative store
    would be lost at the next deploy and never be what `diffray feedback export` reads: refused, naming the
    field. An absolute path, or feedback off, is fine."""
    copy = tmp_path / "session_1" / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123abcd"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    with pytest.raises(ConfigError, match=r"^feedback\.path: .*relative.*working_dir.*absolute path"):
        parse_args({} if feedback is None else {"feedback": feedback})
    assert parse_args({"feedback": {"path": str(tmp_path / "fb.db")}}).feedback.path == str(tmp_path / "fb.db")
    assert not parse_args({"feedback": {"enabled": False}}).feedback.enabled


def test_relative_local_paths_are_pinned_where_the_config_is_read(tmp_path, monkeypatch):
    """A replica's working directory is the one its cluster was started in (`ray start` in another folder, then
    RAY_ADDRESS), so `./adapters` resolved there is not the folder `diffray publish` wrote to: local paths are made
    absolute where the config is read. URIs, builtins, hub ids and absolute paths are kept; in a runtime_env
    working_dir copy relative paths stay relative (each replica reads its own copy of the same files)."""
    (tmp_path / "outputs" / "base").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    args = parse_args({"model": "outputs/base", "controlnets": {"edges": {"path": "./cn"}}})
    assert args.adapters_dir == str(tmp_path / "adapters")
    assert args.model == str(tmp_path / "outputs" / "base")
    assert args.controlnets["edges"].path == str(tmp_path / "cn")
    assert parse_args({"model": "../m"}).model == str(tmp_path.parent / "m")
    for model in ("org/name", "builtin:tiny", "s3://bucket/model", "/abs/model"):
        assert parse_args({"model": model}).model == model
    assert parse_args({"adapters_dir": "s3://bucket/adapters"}).adapters_dir == "s3://bucket/adapters"
    assert parse_args({"adapters_dir": "~/ads"}).adapters_dir == os.path.expanduser("~/ads")
    again = parse_args(args.model_dump(mode="json"))  # the replicas' copy, read elsewhere, keeps the paths
    monkeypatch.chdir(tmp_path / "outputs")
    assert parse_args(args.model_dump(mode="json")) == again == args
    copy = tmp_path / "session_1" / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123abcd"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    args = parse_args({"model": "./base", "feedback": {"enabled": False}})
    assert (args.adapters_dir, args.model) == ("./adapters", "./base")
