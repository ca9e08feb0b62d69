# A DAG of trivial derivations built with the host's /bin/sh: no nixpkgs needed.
#
# `layers` layers of `width` derivations; each depends on up to `fanIn` derivations of the
# layer below; `top` depends on the whole last layer. With the defaults: 101 derivations.
#   nix-instantiate examples/dag.nix -A top --argstr salt "$RANDOM"
#   bigtent build examples/dag.nix -A top --argstr salt "$RANDOM" --arg layers 4
{
  layers ? 10,
  width ? 10,
  fanIn ? 3,
  salt ? "",
  sleep ? 0,
  failing ? [ ], # node names ("LAYER-INDEX") whose builder exits 1
  kvm ? [ ], # node names that require the `kvm` system feature
  system ? builtins.currentSystem,
}:
let
  mod = a: b: a - (a / b) * b;
  node =
    layer: i: deps:
    let
      id = "${toString layer}-${toString i}";
    in
    derivation {
      name = "dag-${id}";
      inherit system salt deps;
      builder = "/bin/sh";
      PATH = "/usr/bin:/bin";
      requiredSystemFeatures = if builtins.elem id kvm then [ "kvm" ] else [ ];
      args = [
        "-c"
        ''
          echo "building node ${id}"
          ${if sleep > 0 then "sleep ${toString sleep}" else ""}
          ${if builtins.elem id failing then "echo 'node ${id} fails on purpose' >&2; exit 1" else ""}
          echo "${id} $deps" > $out
        ''
      ];
    };
  layer =
    l:
    if l == 0 then
      builtins.genList (i: node 0 i [ ]) width
    else
      let
        prev = layer (l - 1);
      in
      builtins.genList (
        i: node l i (builtins.genList (k: builtins.elemAt prev (mod (i + k) width)) (
          if fanIn < width then fanIn else width
        ))
      ) width;
  all = builtins.genList layer layers;
  last = builtins.elemAt all (layers - 1);
in
{
  top = node "top" 0 last;
  layers = all;
  # Every node of the DAG as a flat attribute set, for `-A nodes.dag-3-4`.
  nodes = builtins.listToAttrs (
    map (d: {
      name = d.name;
      value = d;
    }) (builtins.concatLists all)
  );
}
