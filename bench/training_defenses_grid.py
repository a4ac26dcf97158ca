"""The grid of the training-time defenses benchmark (Wu et al. 2022, Table 6): rows, columns, budgets and the
paper's figures, shared by the runner (:mod:`bench.training_defenses`) and its docs writer
(:mod:`bench.training_defenses_docs`), neither of which imports the other's internals.
"""

EPS = 0.3
#: advertorch's published Madry-trained LeNet5, a file in ../shared/data/models.
PUBLISHED = "mnist_lenet5_advtrained.pt"
#: The CPU budget (issue 10): PGD-7 with step 0.05 and a one-epoch eps ramp instead of the paper's PGD-40.
BUDGET = "steps=7,step_size=0.05,eps_ramp=1"
#: The paper's training attack (PGD-40, Madry et al.'s step 0.01) for its 5 epochs, with our one-epoch ramp kept.
PAPER_BUDGET = "steps=40,step_size=0.01,eps_ramp=1"
ROWS = {
    "raw": ("RAW", None),
    "madry": ("Madry", f"at:{BUDGET}"),
    "madry_aad": ("Madry + AAD", f"aad:base=at,{BUDGET}"),
    "alp": ("ALP", f"alp:{BUDGET}"),
    "alp_aad": ("ALP + AAD", f"aad:base=alp,{BUDGET}"),
    "trades": ("TRADES", f"trades:{BUDGET}"),
    "madry_5ep": ("Madry, 5 epochs", f"at:{BUDGET}"),
    "madry_cosine": ("Madry, cosine lr", f"at:{BUDGET}"),
    "madry_pgd40": ("Madry, PGD-40, 5 epochs", f"at:{PAPER_BUDGET}"),
}
#: Rows that differ from their namesake only in ``adv train`` options: the same 3 epochs with the learning
#: rate annealed to 0 (cosine, per step), the usual schedule of adversarial training at no extra cost.
TRAIN_ARGS = {"madry_cosine": ("--schedule", "cosine")}
#: Rows trained longer than ``--epochs`` (the paper's 5 epochs, still PGD-7), and the row whose finished
#: ``--epochs`` state they continue from: same seed, data order and constant lr, so the first epochs are that run's.
EPOCHS = {"madry_5ep": 5, "madry_pgd40": 5}
CONTINUES = {"madry_5ep": "madry"}
#: Column -> (attack, hyperparameters). CW-k is PGD-k on the CW margin loss (Madry et al.'s CW column).
COLUMNS = {"fgsm": ("fgsm", {}), **{f"pgd{k}": ("pgd", {"steps": k}) for k in (10, 20, 40, 100)},
           **{f"cw{k}": ("pgd_cw", {"steps": k}) for k in (10, 20, 40, 100)}}
#: Wu et al. 2022, Table 6, MNIST: clean, FGSM, PGD-10/20/40/100, CW-10/20/40/100 (%).
_PAPER_MADRY = [99.00, 96.92, 95.69, 95.52, 94.14, 92.49, 95.69, 92.69, 87.67, 85.17]
PAPER = {
    "raw": [99.18, 7.72, 0.49, 0.54, 0.64, 0.53, 0.0, 0.0, 0.0, 0.0],
    "madry": _PAPER_MADRY,
    "madry_pgd40": _PAPER_MADRY,  # our row with the paper's training attack faces the same paper row
    "madry_aad": [99.20, 97.12, 98.02, 96.81, 94.77, 93.02, 97.28, 95.04, 91.31, 89.77],
    "alp": [98.61, 97.59, 98.23, 97.52, 96.04, 94.68, 96.96, 95.48, 93.18, 92.39],
    "alp_aad": [98.52, 97.60, 98.24, 97.56, 96.11, 94.82, 97.18, 95.62, 93.54, 92.72],
}

