"""Which names a cell reads from outside and which it assigns: ``%%remote``'s inputs and outputs."""

from __future__ import annotations

import ast
from dataclasses import dataclass, field

__all__ = ["CellNames", "analyze"]

_SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ListComp, ast.SetComp,
           ast.DictComp, ast.GeneratorExp, ast.ClassDef)


@dataclass
class CellNames:
    """The names of one cell.

    Attributes:
        reads: names read before (or without) the cell assigning them, in order of first use.
        writes: names the cell binds at top level (assignments, defs, classes, loops, with).
        imports: names bound by import statements (modules are re-imported, not pulled).
    """

    reads: list[str] = field(default_factory=list)
    writes: list[str] = field(default_factory=list)
    imports: set[str] = field(default_factory=set)


class _Visitor(ast.NodeVisitor):
    def __init__(self) -> None:
        self.names = CellNames()
        self.bound: set[str] = set()
        self.local_stack: list[set[str]] = []

    def _read(self, name: str) -> None:
        if any(name in scope for scope in self.local_stack) or name in self.bound:
            return
        if name not in self.names.reads:
            self.names.reads.append(name)

    def _write(self, name: str) -> None:
        if self.local_stack:
            self.local_stack[-1].add(name)
            return
        self.bound.add(name)
        if name not in self.names.writes:
            self.names.writes.append(name)

    def visit_Name(self, node: ast.Name) -> None:
        if isinstance(node.ctx, ast.Load):
            self._read(node.id)
        elif isinstance(node.ctx, ast.Store):
            self._write(node.id)
        elif isinstance(node.ctx, ast.Del) and not self.local_stack:
            self._read(node.id)
            if node.id in self.names.writes:
                self.names.writes.remove(node.id)

    def visit_Assign(self, node: ast.Assign) -> None:
        self.visit(node.value)  # the right side is read before the targets are bound
        for target in node.targets:
            self.visit(target)

    def visit_AugAssign(self, node: ast.AugAssign) -> None:
        if isinstance(node.target, ast.Name):
            self._read(node.target.id)
        self.visit(node.value)
        self.visit(node.target)

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        if node.value is not None:
            self.visit(node.value)
            self.visit(node.target)

    def visit_NamedExpr(self, node: ast.NamedExpr) -> None:
        self.visit(node.value)
        self.visit(node.target)

    def visit_For(self, node: ast.For | ast.AsyncFor) -> None:
        self.visit(node.iter)
        self.visit(node.target)
        for stmt in [*node.body, *node.orelse]:
            self.visit(stmt)

    visit_AsyncFor = visit_For

    def visit_Import(self, node: ast.Import | ast.ImportFrom) -> None:
        for alias in node.names:
            name = (alias.asname or alias.name).split(".")[0]
            if name != "*":
                self._write(name)
                if not self.local_stack:
                    self.names.imports.add(name)

    visit_ImportFrom = visit_Import

    def visit_Global(self, node: ast.Global) -> None:
        for name in node.names:
            if name not in self.names.writes:
                self.names.writes.append(name)

    def _scope(self, node: ast.AST, params: list[str], body: list[ast.AST]) -> None:
        self.local_stack.append(set(params))
        # Names a nested scope assigns are local to it wherever they appear in it.
        for sub in body:
            for n in ast.walk(sub):
                if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store):
                    self.local_stack[-1].add(n.id)
        for sub in body:
            self.visit(sub)
        self.local_stack.pop()

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        for dec in node.decorator_list:
            self.visit(dec)
        for default in [*node.args.defaults, *node.args.kw_defaults]:
            if default is not None:
                self.visit(default)
        args = node.args
        params = [a.arg for a in [*args.posonlyargs, *args.args, *args.kwonlyargs]]
        params += [a.arg for a in (args.vararg, args.kwarg) if a is not None]
        self._write(node.name)
        self._scope(node, params, list(node.body))

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Lambda(self, node: ast.Lambda) -> None:
        args = node.args
        for default in [*args.defaults, *args.kw_defaults]:
            if default is not None:
                self.visit(default)
        params = [a.arg for a in [*args.posonlyargs, *args.args, *args.kwonlyargs]]
        params += [a.arg for a in (args.vararg, args.kwarg) if a is not None]
        self._scope(node, params, [node.body])

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        for expr in [*node.decorator_list, *node.bases, *(k.value for k in node.keywords)]:
            self.visit(expr)
        self._write(node.name)
        self._scope(node, [], list(node.body))

    def _comprehension(self, node: ast.ListComp | ast.SetComp | ast.GeneratorExp | ast.DictComp,
                       elements: list[ast.AST]) -> None:
        # The first iterable is evaluated in the enclosing scope.
        self.visit(node.generators[0].iter)
        targets = [n.id for g in node.generators for n in ast.walk(g.target)
                   if isinstance(n, ast.Name)]
        rest: list[ast.AST] = [*(g.iter for g in node.generators[1:]),
                               *(c for g in node.generators for c in g.ifs), *elements]
        self._scope(node, targets, rest)

    def visit_ListComp(self, node: ast.ListComp) -> None:
        self._comprehension(node, [node.elt])

    visit_SetComp = visit_ListComp  # type: ignore[assignment]
    visit_GeneratorExp = visit_ListComp  # type: ignore[assignment]

    def visit_DictComp(self, node: ast.DictComp) -> None:
        self._comprehension(node, [node.key, node.value])


def analyze(code: str) -> CellNames:
    """The reads and writes of a cell's Python source.

    Raises:
        SyntaxError: when the cell is not valid Python (after IPython's transforms).
    """
    visitor = _Visitor()
    visitor.visit(ast.parse(code))
    return visitor.names
