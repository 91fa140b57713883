"""Installing deformvit as a library: the wheel, the core requirements alone, the extras' messages, the version.

The wheel is built from this tree (``pip wheel --no-deps``) and inspected. The core test runs the
wheel in a new virtual environment that sees only the distributions the core requirements need
(linked from this environment, so nothing is downloaded): ``import deformvit`` and
``timm.create_model('dat_tiny')`` must work there, and the commands whose extra is missing must say
which ``pip install`` brings it. The slow test installs the wheel with pip itself.
"""
import importlib.metadata as metadata
import os
import subprocess
import sys
import sysconfig
import tomllib
import venv
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

import deformvit
from deformvit.cli import CommandFailed, main
from deformvit.errors import EXTRAS, MissingExtraError, optional

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / 'pyproject.toml').read_text())['project']
CORE = {'torch', 'torchvision', 'timm', 'safetensors', 'numpy', 'pillow', 'pyyaml', 'tqdm'}
# what each extra must bring (by distribution name), and the import names of the optional packages
EXTRA_PACKAGES = {
    'train': {'tensorboard', 'matplotlib'}, 'detection': {'pycocotools', 'scipy'},
    'segmentation': {'segmentation-models-pytorch'}, 'export': {'onnx', 'onnxscript', 'onnxruntime'},
    'demo': {'mlxtend', 'scikit-image'},
}


def _name(requirement: str) -> str:
    return Requirement(requirement).name.lower()


@pytest.fixture(scope='module')
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp('wheel')
    subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation', '--quiet',
                    '-w', str(out), str(ROOT)], check=True, capture_output=True, text=True)
    return next(out.glob('deformvit-*.whl'))


def test_core_requirements_are_ranges_and_extras_hold_the_rest():
    core = {_name(r): Requirement(r) for r in PROJECT['dependencies']}
    assert set(core) == CORE
    for name, requirement in core.items():
        assert all(spec.operator in ('>=', '>', '<', '<=', '!=', '~=') for spec in requirement.specifier), name
    for name in ('torch', 'torchvision', 'timm'):
        assert any(spec.operator == '>=' for spec in core[name].specifier), f'{name} needs a lower bound'
    extras = PROJECT['optional-dependencies']
    for extra, packages in EXTRA_PACKAGES.items():
        assert packages <= {_name(r) for r in extras[extra]}, extra
    assert set(EXTRAS.values()) <= set(extras)
    everything = set().union(*EXTRA_PACKAGES.values())
    assert _name(extras['all'][0]) == 'deformvit' and set(Requirement(extras['all'][0]).extras) == set(EXTRA_PACKAGES)
    assert 'all' in Requirement(extras['dev'][0]).extras and 'pytest' in {_name(r) for r in extras['dev']}
    assert not everything & set(core)


def test_constraints_pin_every_package_the_tests_ran_with():
    pins = {}
    for line in (ROOT / 'constraints.txt').read_text().splitlines():
        if line.strip() and not line.startswith('#'):
            requirement = Requirement(line)
            assert [spec.operator for spec in requirement.specifier] == ['=='], line
            pins[requirement.name.lower().replace('_', '-')] = next(iter(requirement.specifier)).version
    for name in sorted(CORE | set().union(*EXTRA_PACKAGES.values()) | {'pytest'}):
        assert name in pins, f'{name} is not pinned in constraints.txt'
    assert pins['torch'].split('+')[0] == metadata.version('torch').split('+')[0]
    assert pins['timm'] == metadata.version('timm')


def test_the_version_is_the_packages_metadata(capsys):
    assert deformvit.__version__ == metadata.version('deformvit') == PROJECT['version']
    with pytest.raises(SystemExit) as exit_:
        main(['--version'])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f'deformvit {PROJECT["version"]}'


def test_the_wheel_holds_the_package_its_recipes_and_the_requirements(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        meta = archive.read(next(n for n in names if n.endswith('.dist-info/METADATA'))).decode()
    recipes = {f'deformvit/training/recipes/{p.name}' for p in (ROOT / 'src/deformvit/training/recipes').glob('*.yaml')}
    assert recipes and recipes <= names
    sources = {str(p.relative_to(ROOT / 'src')) for p in (ROOT / 'src/deformvit').rglob('*.py')}
    assert sources <= names
    assert not any(n.startswith(('tests/', 'benchmarks/', 'docs/')) for n in names)
    requires = [line.split(':', 1)[1].strip() for line in meta.splitlines() if line.startswith('Requires-Dist:')]
    core = [r for r in requires if 'extra ==' not in r]
    assert {_name(r) for r in core} == CORE and not any('==' in r for r in core)
    assert f'Version: {PROJECT["version"]}' in meta
    for extra in ('train', 'detection', 'segmentation', 'export', 'demo', 'all', 'dev'):
        assert f'Provides-Extra: {extra}' in meta


def _closure(names) -> set:
    """The installed distributions that ``names`` need, their own requirements included (no extras)."""
    seen, todo = set(), [n.lower() for n in names]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.distribution(name).requires or []
        except metadata.PackageNotFoundError:  # a requirement this platform's install went without
            continue
        for line in requires:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({'extra': ''}):
                todo.append(requirement.name.lower())
    return seen


@pytest.fixture(scope='module')
def core_python(wheel, tmp_path_factory) -> Path:
    """The python of a new venv that sees the unpacked wheel and the core requirements' distributions only."""
    root = tmp_path_factory.mktemp('core')
    venv.create(root / 'venv', with_pip=False)
    site = Path(sysconfig.get_path('purelib'))
    linked = root / 'site'
    linked.mkdir()
    for name in _closure(CORE):
        try:
            files = metadata.distribution(name).files or []
        except metadata.PackageNotFoundError:
            continue
        for file in files:
            top = file.parts[0]
            if top != '..' and not (linked / top).exists() and (site / top).exists():
                (linked / top).symlink_to(site / top)
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(root / 'wheel')
    python = root / 'venv' / 'bin' / 'python'
    own_site = subprocess.run([str(python), '-c', 'import sysconfig; print(sysconfig.get_path("purelib"))'],
                              check=True, capture_output=True, text=True).stdout.strip()
    Path(own_site, 'core.pth').write_text(f'{root / "wheel"}\n{linked}\n')
    return python


def _run(python: Path, *args: str, cwd=None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ('PYTHONPATH', 'PYTHONHOME')}
    return subprocess.run([str(python), *args], capture_output=True, text=True, env=env, timeout=300, cwd=cwd)


def test_the_core_alone_imports_deformvit_and_creates_models(core_python):
    script = (
        'import importlib.util, timm, torch, deformvit\n'
        f'extras = {sorted(EXTRAS)!r}\n'
        'present = [m for m in extras if importlib.util.find_spec(m) is not None]\n'
        'assert not present, present\n'
        "model = timm.create_model('dat_tiny').eval()\n"
        'assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1000)\n'
        "loaded = deformvit.load_model('datpp_tiny')\n"
        'print(deformvit.__file__, deformvit.__version__)\n')
    result = _run(core_python, '-c', script)
    assert result.returncode == 0, result.stderr
    assert '/wheel/deformvit/' in result.stdout and result.stdout.split()[-1] == PROJECT['version']
    for command, expected in ((['--version'], f'deformvit {PROJECT["version"]}'), (['count', 'dat_nano'], 'dat_nano:')):
        result = _run(core_python, '-m', 'deformvit', *command)
        assert result.returncode == 0 and result.stdout.startswith(expected), result.stderr


@pytest.mark.parametrize('command, extra', [
    (['train', '--epochs', '1'], 'train'),
    (['demo'], 'demo'),
    (['export', 'dat_nano', '--output', 'x.onnx'], 'export'),
    (['detect', 'train', '--epochs', '1'], 'train'),
])
def test_a_command_without_its_extra_names_the_pip_install(core_python, tmp_path, command, extra):
    result = _run(core_python, '-m', 'deformvit', *command, cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"pip install 'deformvit[{extra}]'" in lines[0], result.stderr
    assert 'Traceback' not in result.stderr


def test_each_optional_package_names_its_extra(monkeypatch):
    for package, extra in EXTRAS.items():
        monkeypatch.setitem(sys.modules, package, None)  # as if not installed
        with pytest.raises(MissingExtraError, match=rf"needs {package}, which is not installed: pip install "
                                                    rf"'deformvit\[{extra}\]'"):
            optional(package, 'This')
    for module in ('pycocotools', 'pycocotools.coco', 'pycocotools.cocoeval', 'pycocotools.mask'):
        monkeypatch.setitem(sys.modules, module, None)  # also when earlier tests imported them
    from deformvit.data.coco import coco_evaluate

    class GroundTruth:  # one image, no detections: the evaluation reaches pycocotools at once
        def getImgIds(self):
            return [1]
    with pytest.raises(MissingExtraError, match=r"COCO evaluation needs pycocotools.*deformvit\[detection\]"):
        coco_evaluate(GroundTruth(), [], ('bbox',))
    with pytest.raises(CommandFailed):
        main(['detect', 'train', '--epochs', '1', '--workers', '0'])


@pytest.mark.slow
def test_pip_installs_the_wheel_with_its_core_requirements_into_a_new_venv(wheel, tmp_path):
    venv.create(tmp_path / 'venv', with_pip=True)
    python = tmp_path / 'venv' / 'bin' / 'python'
    install = subprocess.run([str(python), '-m', 'pip', 'install', '--quiet', str(wheel)], capture_output=True,
                             text=True, timeout=1800)
    assert install.returncode == 0, install.stderr
    result = _run(python, '-c', "import timm, deformvit; timm.create_model('dat_tiny'); print(deformvit.__version__)")
    assert result.returncode == 0 and result.stdout.strip() == PROJECT['version'], result.stderr
    freeze = _run(python, '-m', 'pip', 'freeze').stdout.lower()
    assert 'matplotlib' not in freeze and 'pycocotools' not in freeze and 'mlxtend' not in freeze
