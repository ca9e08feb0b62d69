# The jobs of `bigtent build`'s targets, evaluated in one Nix process (client/targets.py runs
#   nix-instantiate --eval --strict --json --read-write-mode jobs.nix
#     --argstr __bigtentSpec JSON --arg __bigtentRoot0 EXPR ... [user --arg/--argstr ...]
# ). Evaluating a job's drvPath writes its .drv (and its inputs' .drv files) into the store.
#
# __bigtentSpec: { roots = [ { kind = "nix" | "flake"; paths = [ [ COMPONENT ... ] ... ];
# ref = "..."; } ... ]; } where root I is the argument __bigtentRootI, a component is a string
# (an attribute name) or an integer (a list index), and "paths" of a flake are the attribute
# paths tried in order (the first that exists is taken; null stands for the current system).
#
# A "nix" root (a file or -E expression) follows nix-build: the --arg/--argstr values are given
# to a function at the top and along each -A path; the selected value is a derivation, a set
# whose derivation attributes are taken (and whose sets with recurseForDerivations = true are
# entered), or a list of those. A "flake" root follows Hydra's job enumeration: every set that
# is not a derivation is entered; other values are skipped (and listed as skipped).
{ __bigtentSpec, ... }@args:
let
  spec = builtins.fromJSON __bigtentSpec;
  autoArgs = removeAttrs args (
    builtins.filter (n: builtins.substring 0 9 n == "__bigtent") (builtins.attrNames args)
  );
  isDerivation = v: builtins.isAttrs v && (v.type or null) == "derivation";
  autoCall =
    f:
    if builtins.isAttrs f && f ? __functor then
      autoCall (f.__functor f)
    else if builtins.isFunction f then
      f (builtins.intersectAttrs (builtins.functionArgs f) autoArgs)
    else
      f;
  showPath =
    path:
    builtins.concatStringsSep "." (
      map (c: if builtins.isInt c then toString c else c) path
    );
  job = index: path: v: {
    target = index;
    attr = map toString path;
    drvPath = v.drvPath;
    name = v.name or "";
  };
  validName = n: builtins.match "[A-Za-z_][A-Za-z0-9_+-]*" n != null;

  # nix-build's -A: auto-call, then select, one component at a time.
  select =
    text: v0: comps:
    if comps == [ ] then
      v0
    else
      let
        v = autoCall v0;
        c = builtins.head comps;
        rest = builtins.tail comps;
      in
      if builtins.isInt c then
        if !builtins.isList v then
          throw "the expression selected by the selection path '${text}' should be a list but has type '${builtins.typeOf v}'"
        else if c >= builtins.length v then
          throw "list index ${toString c} in selection path '${text}' is out of range"
        else
          select text (builtins.elemAt v c) rest
      else if !builtins.isAttrs v then
        throw "the expression selected by the selection path '${text}' should be a set but has type '${builtins.typeOf v}'"
      else if !(v ? ${c}) then
        throw "attribute '${c}' in selection path '${text}' not found"
      else
        select text v.${c} rest;

  # nix-build's getDerivations.
  nixJobs =
    index: path: v0:
    let
      v = autoCall v0;
      member =
        p: x:
        if isDerivation x then
          [ (job index p x) ]
        else
          nixJobs index p x;
    in
    if isDerivation v then
      [ (job index path v) ]
    else if builtins.isAttrs v then
      builtins.concatMap (
        n:
        let
          x = v.${n};
        in
        if !validName n then
          [ ]
        else if isDerivation x then
          [ (job index (path ++ [ n ]) x) ]
        else if builtins.isAttrs x && (x.recurseForDerivations or false) then
          nixJobs index (path ++ [ n ]) x
        else
          [ ]
      ) (builtins.attrNames v)
    else if builtins.isList v then
      builtins.concatLists (
        builtins.genList (i: member (path ++ [ i ]) (builtins.elemAt v i)) (builtins.length v)
      )
    else
      throw "expression does not evaluate to a derivation (or a set or list of those): ${
        if path == [ ] then "it" else "'${showPath path}'"
      } has type '${builtins.typeOf v}'";

  # Hydra's job enumeration: { jobs, skipped }.
  flakeJobs =
    index: path: v:
    if isDerivation v then
      {
        jobs = [ (job index path v) ];
        skipped = [ ];
      }
    else if builtins.isAttrs v then
      let
        parts = map (n: flakeJobs index (path ++ [ n ]) v.${n}) (builtins.attrNames v);
      in
      {
        jobs = builtins.concatMap (p: p.jobs) parts;
        skipped = builtins.concatMap (p: p.skipped) parts;
      }
    else
      {
        jobs = [ ];
        skipped = [
          {
            target = index;
            attr = map toString path;
            type = builtins.typeOf v;
          }
        ];
      };

  hasPath =
    v: path:
    path == [ ]
    || (
      builtins.isAttrs v
      && v ? ${builtins.head path}
      && hasPath v.${builtins.head path} (builtins.tail path)
    );
  getPath = v: path: if path == [ ] then v else getPath v.${builtins.head path} (builtins.tail path);
  quoteList =
    names:
    let
      quoted = map (p: "'${showPath p}'") names;
      n = builtins.length quoted;
    in
    if n == 1 then
      builtins.head quoted
    else
      "${builtins.concatStringsSep ", " (builtins.genList (i: builtins.elemAt quoted i) (n - 1))} or ${builtins.elemAt quoted (n - 1)}";

  rootJobs =
    index: root:
    let
      value = args."__bigtentRoot${toString index}";
    in
    if root.kind == "flake" then
      let
        outputs = value.outputs;
        paths = map (map (c: if c == null then builtins.currentSystem else c)) root.paths;
        found = builtins.filter (hasPath outputs) paths;
        path =
          if found == [ ] then
            throw "flake '${root.ref}' does not provide attribute ${quoteList paths}"
          else
            builtins.head found;
        selected = getPath outputs path;
      in
      if isDerivation selected || builtins.isAttrs selected then
        flakeJobs index path selected
      else
        throw "flake output attribute '${showPath path}' of '${root.ref}' has type '${builtins.typeOf selected}', not a derivation or a set of derivations"
    else
      {
        jobs = builtins.concatMap (path: nixJobs index path (select (showPath path) value path)) root.paths;
        skipped = [ ];
      };

  results = builtins.genList (i: rootJobs i (builtins.elemAt spec.roots i)) (
    builtins.length spec.roots
  );
in
{
  jobs = builtins.concatMap (r: r.jobs) results;
  skipped = builtins.concatMap (r: r.skipped) results;
}
