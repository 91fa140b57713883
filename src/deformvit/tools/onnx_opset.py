"""Opset 17 for ONNX files that torch.onnx writes at opset 18 (its oldest).

torch.onnx's own conversion fails on these graphs, onnx has no 18 -> 17 adapter for Pad, and
it then keeps opset 18 with only a logged warning; :func:`to_opset_17` rewrites the few
operators that changed, or refuses.
"""
from typing import Optional

from ..errors import optional

__all__ = ['to_opset_17']

# Reduce operators whose ``axes`` attribute became an input in opset 18 (ReduceSum's did in opset 13)
_REDUCE_AXES_TO_ATTRIBUTE = {
    'ReduceL1', 'ReduceL2', 'ReduceLogSum', 'ReduceLogSumExp', 'ReduceMax', 'ReduceMean', 'ReduceMin', 'ReduceProd',
    'ReduceSumSquare'}


def to_opset_17(model):
    """Rewrite an opset-18 ONNX model, as torch.onnx writes it, for opset 17.

    Opset 18 moved the ``axes`` of most Reduce operators from an attribute to an input, gave Pad
    an optional ``axes`` input, Resize the ``antialias`` and ``keep_aspect_ratio_policy``
    attributes and Split ``num_outputs``. Nodes whose opset-17 form computes the same are
    rewritten (constant ``axes`` back to an attribute, default-valued new attributes dropped);
    anything else that changed between the two opsets raises ``ValueError``. (torch.onnx's own
    conversion fails on these graphs, onnx has no 18 -> 17 adapter for Pad, and it then keeps
    opset 18 with only a logged warning.)
    """
    onnx = optional('onnx', 'ONNX export')
    helper, numpy_helper = onnx.helper, onnx.numpy_helper

    graph = model.graph
    constants = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == 'Constant' and node.attribute and node.attribute[0].name == 'value':
            constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)

    def refuse(node, why: str):
        raise ValueError(f'cannot write opset 17: {node.op_type} node {node.name!r} {why}; export with opset 18')

    def since(op_type: str, opset: int) -> Optional[int]:
        """The version of ``op_type``'s definition in force at ``opset`` (None: not defined yet)."""
        try:
            return onnx.defs.get_schema(op_type, opset).since_version
        except onnx.defs.SchemaError:
            return None

    for node in graph.node:
        if node.domain not in ('', 'ai.onnx') or since(node.op_type, 18) == since(node.op_type, 17):
            continue
        if since(node.op_type, 17) is None:
            refuse(node, 'does not exist in opset 17')
        attributes = {a.name: a for a in node.attribute}
        if node.op_type in _REDUCE_AXES_TO_ATTRIBUTE:
            axes = node.input[1] if len(node.input) > 1 and node.input[1] else None
            if axes is not None and axes not in constants:
                refuse(node, 'reduces over axes computed in the graph')
            noop = attributes.get('noop_with_empty_axes')
            if noop is not None:
                if helper.get_attribute_value(noop) and (axes is None or constants[axes].size == 0):
                    refuse(node, 'is a no-op on empty axes')
                node.attribute.remove(noop)
            del node.input[1:]
            if axes is not None and constants[axes].size:
                node.attribute.append(helper.make_attribute('axes', [int(a) for a in constants[axes]]))
        elif node.op_type == 'Pad':
            if len(node.input) > 3 and node.input[3]:
                refuse(node, 'pads only some axes')
        elif node.op_type == 'Resize':
            for name, default in (('antialias', 0), ('keep_aspect_ratio_policy', b'stretch')):
                if name in attributes:
                    if helper.get_attribute_value(attributes[name]) != default:
                        refuse(node, f'uses {name}')
                    node.attribute.remove(attributes[name])
        else:
            refuse(node, 'changed between opset 17 and 18')
    used = {name for node in graph.node for name in node.input} | {out.name for out in graph.output}
    kept = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    for opset in model.opset_import:
        if opset.domain in ('', 'ai.onnx'):
            opset.version = 17
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as err:
        raise ValueError(f'cannot write opset 17: the rewritten graph is not valid ONNX ({err}); '
                         'export with opset 18') from err
    return model
