"""cloudgpu from plain Python: a remote session, remote functions, and what they cost.

    python examples/sdk.py               # on CPU, through this user's local pool
    python examples/sdk.py --gpu H100    # on an H100 (CLOUDGPU_SIMULATE=H100:1 without one)

No IPython, no notebook: the same calls work in a script, a test or a CI job.
`make test` runs this file on the embedded default (tests/test_api.py).
"""

from __future__ import annotations

import argparse

import cloudgpu


class Polynomial:
    """Defined here, in __main__: it travels to the remote kernel by value."""

    def __init__(self, *coefficients: float) -> None:
        self.coefficients = coefficients

    def __call__(self, x: float) -> float:
        return sum(c * x**i for i, c in enumerate(self.coefficients))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", default="cpu", help="hardware to run on (default: cpu)")
    args = parser.parse_args()
    p = Polynomial(1, 2, 3)

    # A session: one remote kernel of your own, state kept from call to call.
    with cloudgpu.session(args.gpu, max_cost=1.0) as s:
        s.push(p=p, xs=list(range(5)))
        s.run("import platform\n"
              "print('evaluating on', platform.node())\n"
              "ys = [p(x) for x in xs]")
        print("ys =", s.pull("ys"))
        print(f"the session ran on {s.hardware} and cost ${s.cost:.6f}")

    # A function: each call runs in a session of its own, released when it returns.
    @cloudgpu.function(gpu=args.gpu, timeout=120)
    def evaluate(x: float) -> float:
        return p(x)  # a closure over a Polynomial: it goes along

    print("evaluate(10) =", evaluate(10))
    print("evaluate.map([1, 2, 3]) =", evaluate.map([1, 2, 3]))
    try:
        evaluate("ten")  # type: ignore[arg-type]
    except cloudgpu.RemoteExecutionError as e:
        print(f"a remote {e.ename} came back: {e.evalue}")

    print(f"spent today: ${cloudgpu.cost()['today']:.6f}")


if __name__ == "__main__":
    main()
