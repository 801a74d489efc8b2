//! Layers every architecture builds on: linear layers with an optional bias
//! and an optional LoRA adapter (PEFT's), and how a training pass draws its
//! dropout masks.

use candle_core::{Tensor, Var};

use crate::linear::{Dropout, FrozenLinear, LinearWeight, LoraPass, linear};

/// How a training micro-batch draws its dropout masks: from `seed`, as rows
/// `first_row..` of a larger batch draw them (a rank's share of a
/// data-parallel batch gets the masks its rows would get in one process).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DropoutDraw {
    pub seed: u64,
    pub first_row: usize,
}

/// A LoRA adapter on a linear layer, as PEFT defines it: `scale · B(A x)`;
/// with a magnitude, PEFT's DoRA (see [`crate::linear::LoraPass`]).
#[derive(Clone)]
pub struct Lora {
    /// `[r, in]`
    pub a: Var,
    /// `[out, r]`
    pub b: Var,
    pub scale: f64,
    /// Dropout on the adapter's input while training.
    pub dropout: f64,
    /// DoRA's magnitude vector `[out]` (PEFT's `lora_magnitude_vector`).
    pub magnitude: Option<Var>,
}

/// `y = x Wᵀ (+ b) (+ LoRA)`, weights in HF's `[out, in]` layout.
#[derive(Clone)]
pub(crate) struct Linear {
    pub(crate) weight: LinearWeight,
    pub(crate) bias: Option<Tensor>,
    pub(crate) lora: Option<Lora>,
}

impl Linear {
    /// `dropout`: how this layer draws its mask while training (`None`:
    /// evaluation). `track`: false where the pass builds no graph
    /// (evaluation, generation, a checkpointed block's forward, whose
    /// backward recomputes with `track` true).
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        dropout: Option<DropoutDraw>,
        track: bool,
    ) -> candle_core::Result<Tensor> {
        let (b, s, d) = x.dims3()?;
        linear(
            &x.reshape((b * s, d))?,
            &self.weight,
            self.bias.as_ref(),
            self.lora_pass(dropout, s * d, track),
        )?
        .reshape((b, s, self.weight.dims2()?.0))
    }

    /// The adapter's part in a pass over inputs of `row_elements` per batch
    /// row: A and B (without their graph unless `track`), and the dropout
    /// masks `dropout` draws.
    fn lora_pass(
        &self,
        dropout: Option<DropoutDraw>,
        row_elements: usize,
        track: bool,
    ) -> Option<LoraPass> {
        self.lora.as_ref().map(|lora| {
            let tracked = |v: &Var| {
                let t = v.as_tensor();
                if track { t.clone() } else { t.detach() }
            };
            LoraPass {
                a: tracked(&lora.a),
                b: tracked(&lora.b),
                magnitude: lora.magnitude.as_ref().map(tracked),
                scale: lora.scale,
                dropout: dropout.filter(|_| lora.dropout > 0.0).map(|draw| Dropout {
                    p: lora.dropout,
                    seed: draw.seed,
                    first_element: draw.first_row * row_elements,
                }),
            }
        })
    }

    /// The layer as a [`FrozenLinear`] for a pass over inputs of
    /// `row_elements` per batch row, with its adapter's A and B (the
    /// variables themselves); `None` where the base weight trains (full
    /// fine-tuning, a trained bias) or the adapter is DoRA.
    pub(crate) fn frozen(
        &self,
        dropout: Option<DropoutDraw>,
        row_elements: usize,
    ) -> Option<(FrozenLinear, Option<[Tensor; 2]>)> {
        let trains = |t: &Tensor| t.is_variable();
        if matches!(&self.weight, LinearWeight::Dense(weight) if trains(weight))
            || self.bias.as_ref().is_some_and(trains)
        {
            return None;
        }
        let pass = self.lora_pass(dropout, row_elements, true);
        let op = FrozenLinear::new(&self.weight, self.bias.as_ref(), pass.as_ref())?;
        Some((op, pass.map(|pass| [pass.a, pass.b])))
    }
}

impl Linear {
    /// The trained weight and bias of a layer that full fine-tuning trains
    /// (both variables, no adapter); `None` for any other layer.
    pub(crate) fn trained(&self) -> Option<[Tensor; 2]> {
        match (&self.weight, &self.bias, &self.lora) {
            (LinearWeight::Dense(weight), Some(bias), None)
                if weight.is_variable() && bias.is_variable() =>
            {
                Some([weight.clone(), bias.clone()])
            }
            _ => None,
        }
    }

    /// The layer's tensors: weight (unless NF4 or bf16-held), bias and adapter, trainable or not.
    pub(crate) fn tensors(&self) -> Vec<Tensor> {
        let mut tensors = Vec::new();
        if let LinearWeight::Dense(weight) = &self.weight {
            tensors.push(weight.clone());
        }
        tensors.extend(self.bias.clone());
        if let Some(lora) = &self.lora {
            tensors.extend([lora.a.as_tensor().clone(), lora.b.as_tensor().clone()]);
            tensors.extend(lora.magnitude.as_ref().map(|m| m.as_tensor().clone()));
        }
        tensors
    }
}

impl DropoutDraw {
    /// The masks of part `number` (1-based; a block, a layer in a block,
    /// told apart by `salt`): each part draws its own, so a recomputed part
    /// draws the same ones.
    pub(crate) fn part(self, number: u64, salt: u64) -> Self {
        Self {
            seed: self.seed ^ number.wrapping_mul(salt),
            ..self
        }
    }
}

/// Linear layer `layer`'s masks (1-based) in a block that draws `block`:
/// each layer its own.
pub(crate) fn layer_dropout(block: Option<DropoutDraw>, layer: u64) -> Option<DropoutDraw> {
    block.map(|draw| draw.part(layer, 0xD1B5_4A32_D192_ED03))
}
