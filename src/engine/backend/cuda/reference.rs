//! Plain f64 host references for the SGMV operator, and the error measure the self-test and the
//! kernel benchmark use. Independent of every backend, so a shared bug cannot hide.

use rayon::prelude::*;

/// One adapter on the host: `a: [rank, h_in]`, `b: [h_out, rank]` (scale folded in).
#[derive(Clone, Debug)]
pub struct HostAdapter {
    pub rank: usize,
    pub a: Vec<f32>,
    pub b: Vec<f32>,
}

/// `v[row, :rank] = x[row] . A^T` for every row of every segment `(start, end, slot)`; rows in
/// no segment, or whose slot is `None`, keep `v`'s previous values.
pub fn shrink(
    x: &[f32],
    h_in: usize,
    segments: &[(usize, usize, usize)],
    adapters: &[Option<HostAdapter>],
    max_rank: usize,
    v: &mut [f64],
) {
    let mut row_adapter = vec![None; v.len() / max_rank.max(1)];
    for &(s, e, slot) in segments {
        if let Some(Some(ad)) = adapters.get(slot) {
            for r in row_adapter.iter_mut().take(e).skip(s) {
                *r = Some(ad);
            }
        }
    }
    v.par_chunks_mut(max_rank)
        .zip(row_adapter.par_iter())
        .enumerate()
        .for_each(|(row, (vr, ad))| {
            let Some(ad) = ad else { return };
            let xr = &x[row * h_in..(row + 1) * h_in];
            for (vk, ar) in vr.iter_mut().zip(ad.a.chunks_exact(h_in)).take(ad.rank) {
                *vk = xr.iter().zip(ar).map(|(&a, &b)| a as f64 * b as f64).sum();
            }
        });
}

/// `y[row, col_offset..+h_out] += v[row, :rank] . B^T` for every segmented row with an adapter.
#[allow(clippy::too_many_arguments)]
pub fn expand(
    v: &[f64],
    max_rank: usize,
    segments: &[(usize, usize, usize)],
    adapters: &[Option<HostAdapter>],
    h_out: usize,
    y_stride: usize,
    col_offset: usize,
    y: &mut [f64],
) {
    let rows = y.len() / y_stride.max(1);
    let mut row_adapter = vec![None; rows];
    for &(s, e, slot) in segments {
        if let Some(Some(ad)) = adapters.get(slot) {
            for r in row_adapter.iter_mut().take(e).skip(s) {
                *r = Some(ad);
            }
        }
    }
    y.par_chunks_mut(y_stride)
        .zip(row_adapter.par_iter())
        .enumerate()
        .for_each(|(row, (yr, ad))| {
            let Some(ad) = ad else { return };
            let vr = &v[row * max_rank..row * max_rank + ad.rank];
            for j in 0..h_out {
                let br = &ad.b[j * ad.rank..(j + 1) * ad.rank];
                let d: f64 = vr.iter().zip(br).map(|(&a, &b)| a * b as f64).sum();
                yr[col_offset + j] += d;
            }
        });
}

/// ‖out − ref‖ / ‖ref‖ over the elements, or infinity when `out` holds a NaN or infinity.
pub fn rel_err(out: &[f32], reference: &[f64]) -> f64 {
    let mut num = 0.0f64;
    let mut den = 0.0f64;
    for (&o, &r) in out.iter().zip(reference) {
        if !o.is_finite() {
            return f64::INFINITY;
        }
        num += (o as f64 - r) * (o as f64 - r);
        den += r * r;
    }
    if den == 0.0 {
        if num == 0.0 { 0.0 } else { f64::INFINITY }
    } else {
        (num / den).sqrt()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn adapter(rank: usize, h_in: usize, h_out: usize, seed: f32) -> HostAdapter {
        HostAdapter {
            rank,
            a: (0..rank * h_in)
                .map(|i| (i as f32 * 0.37 + seed).sin())
                .collect(),
            b: (0..h_out * rank)
                .map(|i| (i as f32 * 0.11 - seed).cos())
                .collect(),
        }
    }

    #[test]
    fn shrink_then_expand_equals_the_dense_product_per_row_and_skips_other_rows() {
        let (h_in, h_out, max_rank) = (5, 3, 4);
        let ads = vec![
            Some(adapter(2, h_in, h_out, 0.5)),
            None,
            Some(adapter(4, h_in, h_out, 1.5)),
        ];
        let x: Vec<f32> = (0..4 * h_in).map(|i| i as f32 * 0.1 - 0.7).collect();
        let segs = [(0, 1, 0), (1, 2, 1), (2, 3, 2)];
        let mut v = vec![7.0f64; 4 * max_rank];
        shrink(&x, h_in, &segs, &ads, max_rank, &mut v);
        let mut y = vec![1.0f64; 4 * h_out];
        expand(&v, max_rank, &segs, &ads, h_out, h_out, 0, &mut y);
        for (row, slot) in [(0usize, 0usize), (2, 2)] {
            let ad = ads[slot].as_ref().unwrap();
            for j in 0..h_out {
                let mut want = 1.0f64;
                for k in 0..ad.rank {
                    let vk: f64 = (0..h_in)
                        .map(|i| x[row * h_in + i] as f64 * ad.a[k * h_in + i] as f64)
                        .sum();
                    want += vk * ad.b[j * ad.rank + k] as f64;
                }
                assert!((y[row * h_out + j] - want).abs() < 1e-9);
            }
        }
        // Row 1 has an empty slot, row 3 no segment: untouched.
        assert!(
            y[h_out..2 * h_out]
                .iter()
                .chain(&y[3 * h_out..])
                .all(|&e| e == 1.0)
        );
        assert!(v[max_rank..2 * max_rank].iter().all(|&e| e == 7.0));
    }

    #[test]
    fn relative_error_flags_nan_and_measures_norm_ratio() {
        assert_eq!(rel_err(&[1.0, 2.0], &[1.0, 2.0]), 0.0);
        assert!(rel_err(&[f32::NAN, 2.0], &[1.0, 2.0]).is_infinite());
        let e = rel_err(&[1.1, 0.0], &[1.0, 0.0]);
        assert!((e - 0.1).abs() < 1e-6);
    }
}
