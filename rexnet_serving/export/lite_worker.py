"""Paddle Lite's ``opt`` and its ``MobileConfig`` predictor, run as a child process by lite_format.

Run as a script (``python lite_worker.py opt|run ...``), never imported by the exporter: a crash in
Paddle Lite (it aborts or segfaults on programs it cannot read) then ends this process only, and the
exporter reports it. It imports only paddlelite and NumPy (Paddle Lite bundles its own OpenMP/MKL).

    lite_worker.py opt MODEL_FILE PARAMS_FILE OUT_PREFIX TARGET   -> OUT_PREFIX.nb
    lite_worker.py run MODEL.nb INPUT.npy OUTPUT.npy              -> the first output as .npy
"""
import sys


def optimize(model_file: str, params_file: str, out_prefix: str, target: str) -> None:
    from paddlelite.lite import Opt
    opt = Opt()
    opt.set_model_file(model_file)
    opt.set_param_file(params_file)
    opt.set_valid_places(target)
    opt.set_model_type("naive_buffer")
    opt.set_optimize_out(out_prefix)
    opt.run()


def run(nb_file: str, input_file: str, output_file: str) -> None:
    import numpy as np
    from paddlelite.lite import MobileConfig, create_paddle_predictor
    config = MobileConfig()
    config.set_model_from_file(nb_file)
    predictor = create_paddle_predictor(config)
    predictor.get_input(0).from_numpy(np.load(input_file))
    predictor.run()
    np.save(output_file, predictor.get_output(0).numpy())


if __name__ == "__main__":
    command, arguments = sys.argv[1], sys.argv[2:]
    if command == "opt":
        optimize(*arguments)
    elif command == "run":
        run(*arguments)
    else:
        sys.exit(f"unknown command {command!r}")
