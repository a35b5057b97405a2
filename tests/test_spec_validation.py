"""Everything a spec can be checked for without data, in load_spec, Spec() and `safekd validate`: one case per
error, each naming the file, the line and the key."""
import math
import subprocess
import sys
from pathlib import Path

import pytest

from safekd import constraints as C
from safekd.cli import main
from safekd.spec import ChecksSpec, DualSpec, Spec, SpecError, TeacherSpec, load_spec

HEAD = "teachers:\n  - {name: a}\n  - {name: b}\n  - {name: c}\n"

# (spec text after HEAD, key, line, message fragment)
FILE_CASES = {
    "kp < 0": ("dual: {rule: nupi, lr: 0.1, kp: -3}\n", "dual.kp", 5, "must be >= 0, got -3"),
    "ema_nu >= 1": ("dual: {rule: nupi, lr: 0.1, ema_nu: 5}\n", "dual.ema_nu", 5, "must be in [0, 1), got 5"),
    "growth < 1": ("dual:\n  rule: augmented_lagrangian\n  growth: 0.5\n", "dual.growth", 7, "must be >= 1, got 0.5"),
    "max_penalty < penalty": ("dual: {rule: augmented_lagrangian, max_penalty: -1}\n", "dual.max_penalty", 5,
                              "must be >= dual.penalty (1.0), got -1"),
    "init nan": ("dual: {init: .nan}\n", "dual.init", 5, "expected a finite number, got nan"),
    "patience 0": ("dual: {patience: 0}\n", "dual.patience", 5, "must be >= 1, got 0"),
    "negative reference_tol": ("checks: {reference_tol: -1.0e-6}\n", "checks.reference_tol", 5,
                               "must be >= 0, got -1e-06"),
    "unknown on_alarm": ("checks: {on_alarm: panic}\n", "checks.on_alarm", 5,
                         "expected one of ['warn', 'stop', 'relax']"),
    "alarm_level 1": ("checks: {alarm_level: 1.0}\n", "checks.alarm_level", 5, "must be in (0, 1), got 1.0"),
    "duplicate key": ("constraints:\n  - {kind: cap, teacher: a, max: 0.1, max: 0.9}\n", "max", 6,
                      "duplicate key 'max' (first at line 6)"),
    "two 0.6 floors": ("constraints:\n  - {kind: floor, teacher: a, min: 0.6}\n  - {kind: cap, teacher: c, max: 0.5}\n"
                       "  - {kind: floor, teacher: b, min: 0.6}\n", "constraints[0]", 6,
                       "minimal conflicting subset: 'floor(a)' (constraints[0], line 6), 'floor(b)' (constraints[2], "
                       "line 8)"),
    "group cap and cap short of 1": ("constraints:\n  - {kind: group_cap, teachers: [a, b], max: 0.3}\n"
                                     "  - {kind: cap, teacher: c, max: 0.5}\n", "constraints[0]", 6,
                                     "'group_cap(a,b)' (constraints[0], line 6), 'cap(c)' (constraints[1], line 7)"),
    "unsafe_rate below 0": ("unsafe: {ids: [0]}\nconstraints:\n  - {kind: unsafe_rate, max: -0.01}\n",
                            "constraints[0]", 7, "`max` must be in [0, 1] (a rate"),
}
NAME_CASES = {
    "integer name": ("teachers:\n  - {name: 123}\n", "teachers[0].name", 2, "expected a non-empty string, got 123"),
    "empty name": ("teachers:\n  - {name: ''}\n", "teachers[0].name", 2, "expected a non-empty string, got ''"),
}


def _check(tmp_path, name, text, key, line, msg):
    path = tmp_path / f"{name.replace(' ', '_')}.yaml"
    path.write_text(text)
    with pytest.raises(SpecError) as exc:
        load_spec(path)
    e = exc.value
    assert (e.key, e.line) == (key, line), str(e)
    assert msg in str(e) and str(e).startswith(f"{path}:{line}: {key}: ")


@pytest.mark.parametrize("case", list(FILE_CASES))
def test_file_errors_name_file_line_and_key(tmp_path, case):
    text, key, line, msg = FILE_CASES[case]
    _check(tmp_path, case, HEAD + text, key, line, msg)


def test_a_duplicate_toml_key_names_its_line(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text('[[teachers]]\nname = "a"\n\n[[constraints]]\nkind = "cap"\nteacher = "a"\nmax = 0.1\nmax = 0.9\n')
    with pytest.raises(SpecError, match="invalid TOML") as exc:
        load_spec(path)
    assert exc.value.line == 8


@pytest.mark.parametrize("case", list(NAME_CASES))
def test_teacher_names_must_be_non_empty_strings(tmp_path, case):
    _check(tmp_path, case, *NAME_CASES[case])


@pytest.mark.parametrize("kw, key, msg", [
    (dict(teachers=[TeacherSpec("a", safety=math.nan)]), "teachers[0].safety", "expected a finite number, got nan"),
    (dict(teachers=[TeacherSpec(123)]), "teachers[0].name", "non-empty string, got 123"),
    (dict(teachers=[TeacherSpec("")]), "teachers[0].name", "non-empty string, got ''"),
    (dict(teachers=[TeacherSpec("a")], dual=DualSpec(kp=-3.0)), "dual.kp", "must be >= 0"),
    (dict(teachers=[TeacherSpec("a")], dual=DualSpec(init=math.nan)), "dual.init", "got nan"),
    (dict(teachers=[TeacherSpec("a")], dual=DualSpec(every=1.5)), "dual.every", "expected an integer"),
    (dict(teachers=[TeacherSpec("a")], checks=ChecksSpec(reference_tol=-1e-6)), "checks.reference_tol", ">= 0"),
    (dict(teachers=[TeacherSpec("a")], checks=ChecksSpec(relax_cost=0.0)), "checks.relax_cost", "must be > 0"),
])
def test_python_built_specs_are_validated_the_same_way(kw, key, msg):
    with pytest.raises(SpecError, match=msg.replace("(", r"\(")) as exc:
        Spec(**kw)
    assert exc.value.key == key


def test_unsafe_rate_error_names_a_rate_not_a_teacher_weight():
    with pytest.raises(ValueError, match=r"`max` must be in \[0, 1\] \(a rate") as exc:
        C.unsafe_rate(-0.01)
    assert "teacher weight" not in str(exc.value)


@pytest.mark.parametrize("suffix", [".yaml", ".toml"])
def test_a_binary_file_is_one_clear_line(tmp_path, suffix, capsys):
    path = tmp_path / f"spec{suffix}"
    path.write_bytes(b"teachers:\n  - {name: a}\n\x89PNG\x00\xff\xfe")
    with pytest.raises(SpecError, match=r"not a UTF-8 text file \(byte 0x89 at offset 24\)") as exc:
        load_spec(path)
    assert exc.value.line == 3
    assert main(["validate", "--spec", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a UTF-8 text file" in err and "Traceback" not in err


def test_validate_accepts_a_valid_job_file(capsys):
    from importlib import resources

    spec = resources.files("safekd.data").joinpath("digits_demo.yaml")
    assert main(["validate", "--spec", str(spec)]) == 0
    assert "ok (" in capsys.readouterr().out


def test_validate_two_floors_exits_2_fast_naming_both_lines(tmp_path):
    """The CLI end to end, in a fresh process: exit 2 with both constraints and their lines, before any data or
    teacher is touched (no training, no solver beyond the box check). Its time is measured, not asserted here:
    about 2.5 s of CPU on a quiet 2-core x86-64 machine, almost all of it importing torch."""
    path = tmp_path / "floors.yaml"
    path.write_text(HEAD + FILE_CASES["two 0.6 floors"][0])
    proc = subprocess.run([sys.executable, "-m", "safekd", "validate", "--spec", str(path)], capture_output=True,
                          text=True, cwd=Path(__file__).parent.parent)
    assert proc.returncode == 2 and proc.stdout == ""
    assert "'floor(a)' (constraints[0], line 6), 'floor(b)' (constraints[2], line 8)" in proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr


def test_validate_lists_every_error_of_the_file_one_line_each(tmp_path, capsys):
    """Errors in several parts are reported together, in file order, one line each with its line number; the
    first error's key and line stay on the exception, and each error is in ``errors``."""
    path = tmp_path / "many.yaml"
    path.write_text(HEAD + "constraints:\n"
                    "  - {kind: cap, teacher: b, max: 1.5x}\n"        # line 6
                    "  - {kind: floor, teacher: zz, min: 0.1}\n"       # line 7
                    "  - {kind: nonsense}\n"                           # line 8
                    "temperature: hot\n")                              # line 9
    with pytest.raises(SpecError) as exc:
        load_spec(path)
    assert [e.line for e in exc.value.errors] == [6, 7, 8, 9]
    assert (exc.value.key, exc.value.line) == ("constraints[0].max", 6)
    assert main(["validate", "--spec", str(path)]) == 2
    err = capsys.readouterr().err
    assert "4 errors in the spec" in err and "unknown teacher 'zz'" in err and "'nonsense'" in err
    assert err.count("\n") == 5 and "Traceback" not in err


def test_a_teacher_error_is_not_repeated_by_the_constraints_naming_it(tmp_path):
    path = tmp_path / "teachers.yaml"
    path.write_text("teachers:\n  - {name: a, safety: high}\n  - {name: b}\n"
                    "constraints:\n  - {kind: cap, teacher: a, max: 0.5}\ntemperature: hot\n")
    with pytest.raises(SpecError) as exc:
        load_spec(path)
    assert [e.key for e in exc.value.errors] == ["teachers[0].safety", "temperature"]
