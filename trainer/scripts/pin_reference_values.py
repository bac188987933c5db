"""Prints the reference log-probs pinned in trainer/tests/reference_values.rs (NumPy only)."""
import os, sys
import numpy as np
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from check_logps_numpy import token_logps

def shapes(cfg):
    h=cfg['hidden_size']; nh=cfg['num_attention_heads']; nkv=cfg['num_key_value_heads']; hd=cfg['head_dim']; i=cfg['intermediate_size']; v=cfg['vocab_size']
    out=[("model.embed_tokens.weight",[v,h]),("model.norm.weight",[h])]
    if not cfg['tie_word_embeddings']: out.append(("lm_head.weight",[v,h]))
    qkvb = cfg['model_type']=='qwen2'
    for l in range(cfg['num_hidden_layers']):
        p=f"model.layers.{l}"
        out += [(f"{p}.input_layernorm.weight",[h]),(f"{p}.post_attention_layernorm.weight",[h])]
        for n,r in [("q_proj",nh*hd),("k_proj",nkv*hd),("v_proj",nkv*hd)]:
            out.append((f"{p}.self_attn.{n}.weight",[r,h]))
            if qkvb: out.append((f"{p}.self_attn.{n}.bias",[r]))
        out.append((f"{p}.self_attn.o_proj.weight",[h,nh*hd]))
        out += [(f"{p}.mlp.gate_proj.weight",[i,h]),(f"{p}.mlp.up_proj.weight",[i,h]),(f"{p}.mlp.down_proj.weight",[h,i])]
    return sorted(out)

def weights(cfg):
    w={}
    for k,(name,shape) in enumerate(shapes(cfg)):
        n=int(np.prod(shape)); i=np.arange(n,dtype=np.float64)
        base = 1.0 if name.endswith("norm.weight") else 0.0
        w[name]=(base + 0.5*np.sin(1.7*i + 0.37*k)).reshape(shape)
    return w

cfgs = {
 "llama": {"model_type":"llama","vocab_size":16,"hidden_size":8,"intermediate_size":12,"num_hidden_layers":2,"num_attention_heads":2,"num_key_value_heads":1,"head_dim":4,"rms_norm_eps":1e-5,"rope_theta":500000.0,"tie_word_embeddings":False,
           "rope_scaling":{"rope_type":"llama3","factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":16}},
 "qwen2": {"model_type":"qwen2","vocab_size":16,"hidden_size":8,"intermediate_size":12,"num_hidden_layers":2,"num_attention_heads":2,"num_key_value_heads":1,"head_dim":4,"rms_norm_eps":1e-6,"rope_theta":10000.0,"tie_word_embeddings":True},
}
seqs=[[1,5,9,2,14,3,3,7],[0,15,4]]
for name,cfg in cfgs.items():
    w=weights(cfg)
    for s in seqs:
        lp=token_logps(cfg,w,np.array(s))
        print(name, s, [repr(float(x)) for x in lp])
