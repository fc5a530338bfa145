"""The training job: `python -m train --config train/configs/<name>.yaml [key.sub=value ...]`."""
