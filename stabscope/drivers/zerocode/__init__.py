"""Recording an unmodified training script: ``stabscope profile train.py -- <script args>``.

The script runs as ``__main__`` with its own arguments, and stabscope follows it from the
outside, with no change to its code:

- ``optimizers.py``: every ``torch.optim.Optimizer`` the script constructs, and which of
  them train the model (a step ends once each of them has stepped);
- ``roots.py``: the modules the script calls from outside any other module, and several
  trained models recorded as one;
- ``losses.py``: the scalar on which the script calls ``.backward()``;
- ``attach.py``: which module is the model, where each step ends, when recording stops;
- ``compiled.py``: ``torch.compile``: compiled modules, their notes, Dynamo's counters;
- ``empty_run.py``: the meta.json of a script whose model was never found;
- ``runner.py``: running the script as ``__main__`` and turning how it ended into a result;
- ``detect.py``: whether a file is a model script or a training script.

The statistics are the Recorder's own (hooks, probes, schedule, writer, meta.json): this
package only decides when to start a Recorder, where each step ends and what the loss was.
The rules are written out in docs/zero-code.md.
"""

from .detect import follows_model_script_convention
from .runner import TrainingScriptResult, profile_training_script

__all__ = ["TrainingScriptResult", "follows_model_script_convention", "profile_training_script"]
