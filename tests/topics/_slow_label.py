"""A labelling run whose classifier is slowed down, so a test can kill it between chunks.

argv: data_prefix model_dir seconds_per_chunk
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron_syne.topics import classifier  # noqa: E402
from megatron_syne.topics.labeling import LabelConfig, label_dataset  # noqa: E402

_predict = classifier.TopicModel.predict


def _slow_predict(self, *args, **kwargs):
    time.sleep(float(sys.argv[3]))
    return _predict(self, *args, **kwargs)


classifier.TopicModel.predict = _slow_predict
label_dataset(LabelConfig(sys.argv[1], sys.argv[2], chunk_size=4, workers=1, progress=False))
