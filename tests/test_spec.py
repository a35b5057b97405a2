"""Spec files: YAML and TOML load to the same Spec, to_dict round-trips, errors name the key and line."""
import pytest

from safekd import constraints as C
from safekd.spec import Spec, SpecError, TeacherSpec, load_spec

YAML = """\
teachers:
  - {name: clean, safety: 0.9}
  - {name: raw, safety: 0.1, temperature: 2.0}
unsafe: {ids: [3, 17]}
constraints:
  - {kind: cap, teacher: raw, max: 0.4}
  - {kind: unsafe_mass, max: 0.05}
  - {kind: safety_order}
  - kind: kl_to
    teacher: clean
    max: 0.5
    on: {task_ids: [1]}
  - {kind: unsafe_rate, max: 0.02, tolerance: 0.001}
  - {kind: metric, fn: margin, sense: ">=", threshold: 0.1, proxy: margin}
dual: {rule: nupi, lr: 0.05, kp: 0.1}
checks: {reference_every: 10}
"""

TOML = """\
temperature = 1.0

[[teachers]]
name = "clean"
safety = 0.9

[[teachers]]
name = "raw"
safety = 0.1
temperature = 2.0

[unsafe]
ids = [3, 17]

[[constraints]]
kind = "cap"
teacher = "raw"
max = 0.4

[[constraints]]
kind = "unsafe_mass"
max = 0.05

[[constraints]]
kind = "safety_order"

[[constraints]]
kind = "kl_to"
teacher = "clean"
max = 0.5
on = { task_ids = [1] }

[[constraints]]
kind = "unsafe_rate"
max = 0.02
tolerance = 0.001

[[constraints]]
kind = "metric"
fn = "margin"
sense = ">="
threshold = 0.1
proxy = "margin"

[dual]
rule = "nupi"
lr = 0.05
kp = 0.1

[checks]
reference_every = 10
"""


def margin(logits, batch):
    return (logits[..., 0] - logits[..., 1]).mean()


FUNCS = {"margin": margin}


def _write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_yaml_and_toml_load_the_same_spec_and_round_trip(tmp_path):
    y = load_spec(_write(tmp_path, "s.yaml", YAML), functions=FUNCS)
    t = load_spec(_write(tmp_path, "s.toml", TOML), functions=FUNCS)
    assert y.to_dict() == t.to_dict()
    assert y.teacher_names == ("clean", "raw") and y.dual.rule == "nupi" and y.checks.reference_every == 10
    kinds = [type(c) for c in y.constraints]
    assert kinds == [C.Cap, C.UnsafeMass, C.SafetyOrder, C.KLTo, C.UnsafeRate, C.Metric]
    assert y.constraints[3].on == C.TokenPredicate(task_ids=(1,))  # YAML `on:` is a key, not boolean true
    again = Spec.from_dict(y.to_dict(), functions=FUNCS)
    assert again.to_dict() == y.to_dict() and again.constraints[5].fn is margin


def test_python_built_spec_round_trips():
    spec = Spec(teachers=[TeacherSpec("a", 1.0), TeacherSpec("b", 0.0), TeacherSpec("c", 0.5)],
                constraints=[C.group_cap(["a", "b"], 0.9), C.exclude("b", {"labels": [5]}), C.retain("accuracy", 0.7)],
                unsafe=[1, 2])
    assert Spec.from_dict(spec.to_dict()).to_dict() == spec.to_dict()


def test_student_support_and_margin_load_and_round_trip(tmp_path):
    text = YAML.replace("kind: unsafe_rate, max: 0.02", "kind: unsafe_rate, max: 0.02, margin: 0.005")
    text = text.replace("fn: margin,", "fn: margin, support: [-1, 1], margin: 0.1,")
    spec = load_spec(_write(tmp_path, "s.yaml", text), functions=FUNCS)
    rate, user = spec.constraints[4], spec.constraints[5]
    assert rate.margin == 0.005 and rate.train_threshold == pytest.approx(0.015)
    assert user.value_support == (-1.0, 1.0) and user.margin == 0.1
    assert Spec.from_dict(spec.to_dict(), functions=FUNCS).to_dict() == spec.to_dict()
    built = Spec(teachers=[TeacherSpec("a"), TeacherSpec("b")], constraints=[C.retain("accuracy", 0.7, support="binary", margin=0.05)])
    assert Spec.from_dict(built.to_dict()).to_dict() == built.to_dict()
    with pytest.raises(SpecError, match=r"constraints\[4\]\.margin.*>= 0"):
        load_spec(_write(tmp_path, "m.yaml", text.replace("margin: 0.005", "margin: -1")), functions=FUNCS)
    with pytest.raises(SpecError, match=r"constraints\[5\]\.support.*'binary' or \[lo, hi\]"):
        load_spec(_write(tmp_path, "u.yaml", text.replace("support: [-1, 1]", "support: wide")), functions=FUNCS)


@pytest.mark.parametrize("fmt", ["yaml", "toml"])
def test_unknown_teacher_error_points_at_key_and_line(tmp_path, fmt):
    text = (YAML if fmt == "yaml" else TOML).replace('teacher: clean', 'teacher: dirty').replace(
        'teacher = "clean"', 'teacher = "dirty"')
    with pytest.raises(SpecError) as exc:
        load_spec(_write(tmp_path, f"s.{fmt}", text), functions=FUNCS)
    e = exc.value
    lines = text.splitlines()
    assert e.key == "constraints[3].teacher" and "dirty" in lines[e.line - 1]
    assert "known teachers: ['clean', 'raw']" in str(e) and f":{e.line}:" in str(e)


def test_validation_errors(tmp_path):
    cases = [
        ("teachers: [{name: a}]\nconstraints: [{kind: cap, teacher: a, max: 0.5, maxx: 1}]\n",
         "constraints[0].maxx", "unknown key 'maxx'"),
        ("teachers: [{name: a}]\nconstraints: [{kind: unsafe_rate, max: 0.1}]\n", "constraints[0]",
         "needs an unsafe set"),
        ("teachers: [{name: a}, {name: b, safety: 1}]\nconstraints: [{kind: safety_order}]\n", "constraints[0]",
         "missing on ['a']"),
        ("teachers: [{name: a}]\ndual: {rule: adam}\n", "dual.rule", "unknown dual rule 'adam'"),
        ("teachers: [{name: a}]\nconstraints: [{kind: metric, fn: nope, sense: '<=', threshold: 1}]\n",
         "constraints[0].fn", "not registered"),
        ("teachers: [{name: a}, {name: a}]\n", "teachers[1].name", "duplicate teacher name"),
        ("teachers: [{name: a}]\nconstraints: [{kind: cap, teacher: a, max: high}]\n", "constraints[0].max",
         "expected a finite number"),
    ]
    for i, (text, key, msg) in enumerate(cases):
        with pytest.raises(SpecError, match=msg.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")) as exc:
            load_spec(_write(tmp_path, f"c{i}.yaml", text), functions=FUNCS)
        assert exc.value.key == key and exc.value.line is not None


def test_invalid_file_syntax(tmp_path):
    with pytest.raises(SpecError, match="invalid TOML"):
        load_spec(_write(tmp_path, "bad.toml", "teachers = [\n"))
    with pytest.raises(SpecError, match="unknown spec format"):
        load_spec(_write(tmp_path, "s.json", "{}"))
    with pytest.raises(SpecError, match="duplicate constraint name"):
        Spec(teachers=[TeacherSpec("a")], constraints=[C.cap("a", 0.5), C.cap("a", 0.4)])


def test_load_document_gives_raw_sections_and_line_locator(tmp_path):
    from safekd.spec import load_document

    y = load_document(_write(tmp_path, "job.yaml", "job:\n  epochs: 3\n  on: yes\nteachers:\n  - {name: a}\n"))
    assert y.data["job"] == {"epochs": 3, "on": "yes"}  # YAML 1.2 booleans: `on`/`yes` stay strings
    assert (y.locate("job.epochs"), y.locate("job.on"), y.locate("teachers[0].name")) == (2, 3, 5)
    assert y.source.endswith("job.yaml")
    t = load_document(_write(tmp_path, "job.toml", "[job]\nepochs = 3\n\n[[teachers]]\nname = 'a'\n"))
    assert t.data["job"]["epochs"] == 3 and (t.locate("job.epochs"), t.locate("teachers[0].name")) == (2, 5)
    with pytest.raises(SpecError, match="the spec must be a mapping") as exc:
        load_document(_write(tmp_path, "list.yaml", "- 1\n- 2\n"))
    assert exc.value.line == 1
    with pytest.raises(FileNotFoundError):
        load_document(tmp_path / "missing.yaml")
