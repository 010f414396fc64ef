"""Headline numbers, their seed spread, and the tolerance check of a run against committed tables."""

import numpy as np

from invariscope.evaluation import headline

T1 = """method,n_slices,ssim_mean,ssim_sd,psnr_mean,psnr_sd,rmse_mean,rmse_sd
LD,39,0.224,0.05,18.63,1.85,206.3,55.7
CNN-10,39,{ssim},0.08,{psnr},1.57,80.3,17.9
"""
T2 = """method,label,metric,n,mean,sd,U,p_raw,p_bh,stars,most
cnn10,CNN-10,s_vae,48,{svae},0.05,1,0.5,0.9,,False
"""
CONTROLS = """denoiser,sd_ratio_smoothed,hf_share
gaussri,{ratio},0.82
"""


def _run(folder, ssim=0.55, psnr=26.5, svae=0.944, ratio=15.7):
    folder.mkdir(parents=True)
    (folder / "table1.csv").write_text(T1.format(ssim=ssim, psnr=psnr))
    (folder / "table2.csv").write_text(T2.format(svae=svae))
    (folder / "controls.csv").write_text(CONTROLS.format(ratio=ratio))
    return folder


def test_numbers_and_spread(tmp_path):
    runs = {"a": _run(tmp_path / "a"), "b": _run(tmp_path / "b", psnr=27.5, ratio=11.7),
            "c": _run(tmp_path / "c", psnr=26.0, ratio=20.5)}
    nums = headline.from_folder(runs["a"])
    assert nums["table1/CNN-10/psnr"] == 26.5 and nums["table2/CNN-10/s_vae"] == 0.944
    assert nums["controls/gaussri/sd_ratio_smoothed"] == 15.7 and len(nums) == 9
    df = headline.spread(runs)
    assert np.isclose(df.loc["table1/CNN-10/psnr", "sd"], np.std([26.5, 27.5, 26.0], ddof=1))
    assert df.loc["table1/LD/psnr", "sd"] == 0.0


def test_check_uses_three_seed_sds_and_the_rounding(tmp_path):
    committed = headline.from_folder(_run(tmp_path / "c"))
    sds = {"table1/CNN-10/psnr": 0.4, "controls/gaussri/sd_ratio_smoothed": 1.0}
    now = dict(committed, **{"table1/CNN-10/psnr": 26.5 + 1.1,      # within 3 x 0.4
                             "controls/gaussri/sd_ratio_smoothed": 19.0,  # outside 3 x 1.0
                             "table1/LD/psnr": 18.63 + 0.04,          # within the rounding
                             "table2/CNN-10/s_vae": 0.950})           # no spread known
    del now["table1/CNN-10/rmse"]
    v = headline.check(now, committed, sds).set_index("number")["verdict"]
    assert v["table1/CNN-10/psnr"] == "within" and v["table1/LD/psnr"] == "within"
    assert v["controls/gaussri/sd_ratio_smoothed"] == "outside"
    assert v["table2/CNN-10/s_vae"] == "no spread" and v["table1/CNN-10/rmse"] == "missing"
    assert (v == "within").sum() == len(v) - 3


def test_cohort_hash_of_a_physics_table():
    text = ',value\n"LD vs FD RMSE, test slices (HU)",206 ± 55\ncohort content hash,b5b07d227f0f49ca\n'
    assert headline.cohort_hash(text) == "b5b07d227f0f49ca" and headline.cohort_hash(None) is None
    assert headline.cohort_hash(',value\nx,1\n') is None
