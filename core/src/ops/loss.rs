//! Cross-entropy over logits rows, forward and backward together.

/// Mean cross-entropy of `logits` (`[rows, V]`) against `targets` (`[rows]`), with per-row
/// weights `mask` (1 counts, 0 ignores; `None` = all count), averaged over `denom` (the number
/// of counted rows when `None`). Writes `dlogits = (softmax − onehot)·mask/denom` and returns the
/// loss.
pub fn cross_entropy(
    logits: &[f32],
    targets: &[u32],
    mask: Option<&[f32]>,
    denom: Option<f32>,
    dlogits: &mut [f32],
) -> f32 {
    let rows = targets.len();
    let v = logits.len() / rows.max(1);
    let n = denom.unwrap_or_else(|| mask.map_or(rows as f32, |m| m.iter().sum()));
    let mut loss = 0f64;
    for r in 0..rows {
        let z = &logits[r * v..(r + 1) * v];
        let dz = &mut dlogits[r * v..(r + 1) * v];
        let wgt = mask.map_or(1.0, |m| m[r]);
        if wgt == 0.0 || n == 0.0 {
            dz.fill(0.0);
            continue;
        }
        let lse = super::softmax::logsumexp(z);
        let t = targets[r] as usize;
        loss += (wgt * (lse - z[t])) as f64;
        for (d, &zv) in dz.iter_mut().zip(z) {
            *d = super::fastmath::exp(zv - lse) * wgt / n;
        }
        dz[t] -= wgt / n;
    }
    if n == 0.0 {
        0.0
    } else {
        (loss / n as f64) as f32
    }
}
