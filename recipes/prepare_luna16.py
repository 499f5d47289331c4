"""Recipe: turn a LUNA16 download into a medfound datalist.

    medfound run prepare_luna16 luna_dir=/data/LUNA16 out=/data/luna16_prepared

LUNA16_DIR holds subset0/ ... subset9/ (<seriesuid>.mhd + .raw) and annotations.csv. Writes
OUT/luna16/datalist.json (split by subset: val_subsets → validation, test_subsets → test) and
a copy of the CSVs; then train with `data=luna16 network=retinanet_reference data.root=OUT`.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from medfound.data.luna16 import prepare_luna16
from medfound.errors import exit_on_user_error


@hydra.main(version_base=None, config_path="../configs", config_name="prepare_luna16")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    path = prepare_luna16(cfg.luna_dir, cfg.out, val_subsets=tuple(cfg.val_subsets),
                          test_subsets=tuple(cfg.test_subsets))
    print(f"datalist: {path}")


if __name__ == "__main__":
    main()
