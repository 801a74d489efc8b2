//! Matrix products in f32 on the CPU, for two costs of candle's own matmul
//! there: it zeroes its whole output on one thread before gemm overwrites it
//! (64 MB per chunk of the LM head's logits), and it runs a batch of products
//! one after another, each split over all threads. The attention's products
//! are such a batch, one `[T, d]·[d, T]` per head and row, where splitting so
//! small a product costs more than it gains (61 GFLOP/s for 32 of 256×64×256
//! on two AVX-512 cores). Here gemm writes into fresh memory, and a batch's
//! products run in parallel, each on one thread. [`add_product`] also lets
//! gemm add a product into a tensor that holds a bias or another product.

use candle_core::{CpuStorage, CustomOp2, InplaceOp3, Layout, Result, Shape, Tensor, bail};
use gemm::Parallelism;
use rayon::prelude::*;

use crate::fused;

/// `lhs · rhs` as candle's `matmul` computes it (`[.., m, k] · [.., k, n]`,
/// the same leading dims), with its gradients. Other dtypes and devices, and
/// shapes that do not fit, go to candle's `matmul`.
pub fn matmul(lhs: &Tensor, rhs: &Tensor) -> Result<Tensor> {
    if product_dims(lhs.dims(), rhs.dims()).is_none() {
        return lhs.matmul(rhs);
    }
    if !(fused::applies(lhs) && fused::applies(rhs)) {
        // candle's batched products (CUDA's too) take only some layouts of
        // the leading dims; contiguous ones always.
        return match lhs.rank() {
            2 => lhs.matmul(rhs),
            _ => lhs.contiguous()?.matmul(&rhs.contiguous()?),
        };
    }
    strided(lhs)?.apply_op2(&strided(rhs)?, Product)
}

/// `x`, copied only where its batch dims are not one stride apart.
fn strided(x: &Tensor) -> Result<Tensor> {
    match Matrices::of(x.layout()) {
        Some(_) => Ok(x.clone()),
        None => x.contiguous(),
    }
}

/// Where a batch of matrices lies in its storage: matrix `b`'s element
/// `[i, j]` at `start + b · batch + i · row + j · column`.
#[derive(Clone, Copy)]
struct Matrices {
    start: usize,
    batch: usize,
    row: usize,
    column: usize,
}

impl Matrices {
    /// `None` where the leading dims cannot be walked with one stride.
    fn of(layout: &Layout) -> Option<Self> {
        let (dims, strides) = (layout.dims(), layout.stride());
        let rank = dims.len();
        // Innermost first; dims of one element have no stride to keep.
        let leading: Vec<usize> = (0..rank - 2).rev().filter(|&d| dims[d] > 1).collect();
        if leading
            .windows(2)
            .any(|pair| strides[pair[1]] != strides[pair[0]] * dims[pair[0]])
        {
            return None;
        }
        Some(Self {
            start: layout.start_offset(),
            batch: leading.first().map_or(0, |&d| strides[d]),
            row: strides[rank - 2],
            column: strides[rank - 1],
        })
    }

    /// Matrix `index` of the batch.
    fn at(&self, index: usize) -> Placed {
        Placed {
            start: self.start + index * self.batch,
            row: self.row,
            column: self.column,
        }
    }
}

/// `total + lhs · rhs` (`total`: `[.., m, n]`), added into `total`'s own
/// storage where it can be: gemm adds each product into the values it
/// finds, so there is no product tensor beside `total`, nor a second pass to
/// add it. That is where all three are f32 CPU tensors without a graph and
/// `total` is contiguous; the caller passes a `total` whose storage is no
/// other tensor's. Elsewhere a new tensor, differentiable.
pub fn add_product(total: Tensor, lhs: &Tensor, rhs: &Tensor) -> Result<Tensor> {
    let in_place = [&total, lhs, rhs]
        .iter()
        .all(|x| fused::applies(x) && !x.track_op())
        && total.is_contiguous()
        && product_dims(lhs.dims(), rhs.dims()).as_deref() == Some(total.dims());
    if !in_place {
        return total + matmul(lhs, rhs)?;
    }
    total.inplace_op3(&strided(lhs)?, &strided(rhs)?, &AddProduct)?;
    Ok(total)
}

/// The dims of `lhs · rhs`, or `None` where they do not fit.
fn product_dims(lhs: &[usize], rhs: &[usize]) -> Option<Vec<usize>> {
    let rank = lhs.len();
    let fits = rank >= 2
        && rhs.len() == rank
        && lhs[..rank - 2] == rhs[..rank - 2]
        && lhs[rank - 1] == rhs[rank - 2];
    fits.then(|| [&lhs[..rank - 1], &rhs[rank - 1..]].concat())
}

/// A batch of products: how many, and `[m, k] · [k, n]`.
#[derive(Clone, Copy)]
struct Sizes {
    count: usize,
    m: usize,
    k: usize,
    n: usize,
}

impl Sizes {
    fn of(lhs: &Layout, rhs: &Layout) -> Result<Self> {
        let Some(dims) = product_dims(lhs.dims(), rhs.dims()) else {
            bail!("product: {:?} · {:?} do not fit", lhs.dims(), rhs.dims());
        };
        let rank = dims.len();
        Ok(Self {
            count: dims[..rank - 2].iter().product(),
            m: dims[rank - 2],
            k: lhs.dims()[rank - 1],
            n: dims[rank - 1],
        })
    }

    fn values(&self) -> usize {
        self.count * self.m * self.n
    }
}

/// Writes the batch of products `lhs · rhs` into `dst` (`sizes.count`
/// contiguous `[m, n]` matrices), or adds them to what it holds with
/// `accumulate`. Without `accumulate` gemm never reads `dst`, which may be
/// uninitialised.
fn multiply(
    dst: Dst,
    accumulate: bool,
    (lhs, lhs_layout): (&[f32], &Layout),
    (rhs, rhs_layout): (&[f32], &Layout),
) -> Result<()> {
    let sizes = Sizes::of(lhs_layout, rhs_layout)?;
    let Sizes { count, m, k, n } = sizes;
    let (Some(a), Some(b)) = (Matrices::of(lhs_layout), Matrices::of(rhs_layout)) else {
        bail!("product: the batch dims must be one stride apart");
    };
    if sizes.values() == 0 {
        return Ok(());
    }
    let threads = rayon::current_num_threads();
    let one = |index: usize, parallelism: Parallelism| {
        let dst_at = Placed::rows_of(n).down(index * m);
        // SAFETY: matrix `index` is its own `m · n` values of `dst`, written
        // by no other call.
        #[allow(unsafe_code)]
        unsafe {
            product_at(
                (dst, dst_at),
                accumulate,
                (lhs, a.at(index)),
                (rhs, b.at(index)),
                [m, k, n],
                parallelism,
            )
        }
    };
    if count >= threads && threads > 1 {
        (0..count)
            .into_par_iter()
            .try_for_each(|index| one(index, Parallelism::None))
    } else {
        (0..count).try_for_each(|index| one(index, Parallelism::Rayon(threads)))
    }
}

fn f32_values(storage: &CpuStorage) -> Result<&[f32]> {
    match storage {
        CpuStorage::F32(values) => Ok(values),
        _ => bail!("product: f32 inputs only"),
    }
}

struct Product;

impl CustomOp2 for Product {
    fn name(&self) -> &'static str {
        "product"
    }

    fn cpu_fwd(
        &self,
        lhs: &CpuStorage,
        lhs_layout: &Layout,
        rhs: &CpuStorage,
        rhs_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let sizes = Sizes::of(lhs_layout, rhs_layout)?;
        let mut out = Vec::<f32>::new();
        multiply(
            Dst::spare(&mut out, sizes.values()),
            false,
            (f32_values(lhs)?, lhs_layout),
            (f32_values(rhs)?, rhs_layout),
        )?;
        // SAFETY: `multiply` wrote every one of these values.
        #[allow(unsafe_code)]
        unsafe {
            out.set_len(sizes.values())
        };
        let dims = product_dims(lhs_layout.dims(), rhs_layout.dims()).expect("checked sizes");
        Ok((CpuStorage::F32(out), dims.into()))
    }

    fn bwd(
        &self,
        lhs: &Tensor,
        rhs: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // A frozen input gets no gradient (candle would compute one anyway).
        let lhs_grad = match lhs.track_op() {
            true => Some(matmul(grad, &rhs.t()?)?),
            false => None,
        };
        let rhs_grad = match rhs.track_op() {
            true => Some(matmul(&lhs.t()?, grad)?),
            false => None,
        };
        Ok((lhs_grad, rhs_grad))
    }
}

struct AddProduct;

impl InplaceOp3 for AddProduct {
    fn name(&self) -> &'static str {
        "add-product"
    }

    fn cpu_fwd(
        &self,
        total: &mut CpuStorage,
        total_layout: &Layout,
        lhs: &CpuStorage,
        lhs_layout: &Layout,
        rhs: &CpuStorage,
        rhs_layout: &Layout,
    ) -> Result<()> {
        let total = fused::values_mut(total, total_layout)?;
        multiply(
            Dst::of(total),
            true,
            (f32_values(lhs)?, lhs_layout),
            (f32_values(rhs)?, rhs_layout),
        )
    }
}

/// Where a product's output starts and how many values it holds, shared by
/// the tasks that each write their own matrices of it.
#[derive(Clone, Copy)]
pub(crate) struct Dst {
    start: *mut f32,
    len: usize,
}

impl Dst {
    /// All of `values`, which must outlive every use of the result.
    pub(crate) fn of(values: &mut [f32]) -> Self {
        Self {
            start: values.as_mut_ptr(),
            len: values.len(),
        }
    }

    /// The first `len` values of `values`' spare capacity (its length is
    /// set once they are written). Debug builds fill them with NaN first,
    /// so that a test sees any value read before it is written.
    pub(crate) fn spare(values: &mut Vec<f32>, len: usize) -> Self {
        values.reserve(len);
        // SAFETY: `reserve` made room for `len` values there.
        #[cfg(debug_assertions)]
        #[allow(unsafe_code)]
        unsafe {
            values.as_mut_ptr().write_bytes(0xFF, len)
        };
        Self {
            start: values.as_mut_ptr(),
            len,
        }
    }
}

/// Where one matrix lies in a slice: element `[i, j]` at `start + i · row +
/// j · column`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Placed {
    pub start: usize,
    pub row: usize,
    pub column: usize,
}

impl Placed {
    /// A row-major matrix of `columns` at the slice's start.
    pub(crate) fn rows_of(columns: usize) -> Self {
        Self {
            start: 0,
            row: columns,
            column: 1,
        }
    }

    /// The transpose, read in place.
    pub(crate) fn t(self) -> Self {
        Self {
            row: self.column,
            column: self.row,
            ..self
        }
    }

    /// The matrix from its row `rows` on.
    pub(crate) fn down(self, rows: usize) -> Self {
        Self {
            start: self.start + rows * self.row,
            ..self
        }
    }

    /// Whether `[rows, columns]` of it lie within `len` values.
    fn fits(&self, rows: usize, columns: usize, len: usize) -> bool {
        rows == 0
            || columns == 0
            || self.start + (rows - 1) * self.row + (columns - 1) * self.column < len
    }
}

/// `dst (+)= lhs · rhs` of one `[m, k] · [k, n]` product, each matrix where
/// its [`Placed`] says in its slice (checked), on `parallelism`'s threads.
/// Without `accumulate` gemm never reads `dst`, which may be uninitialised.
///
/// # Safety
/// `dst` must be valid for writes, and calls running at the same time must
/// write disjoint elements of it.
#[allow(unsafe_code)]
pub(crate) unsafe fn product_at(
    (dst, dst_at): (Dst, Placed),
    accumulate: bool,
    (lhs, lhs_at): (&[f32], Placed),
    (rhs, rhs_at): (&[f32], Placed),
    [m, k, n]: [usize; 3],
    parallelism: Parallelism,
) -> Result<()> {
    let k_reads = |fits: bool| k == 0 || fits;
    if !(dst_at.fits(m, n, dst.len)
        && k_reads(lhs_at.fits(m, k, lhs.len()))
        && k_reads(rhs_at.fits(k, n, rhs.len())))
    {
        bail!("product: a matrix reaches past its slice");
    }
    // SAFETY: the reads stay inside `lhs` and `rhs` and the writes inside
    // `dst` (checked above; with `k == 0` gemm reads neither); the caller
    // keeps concurrent writes apart.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.start.wrapping_add(dst_at.start),
            dst_at.column as isize,
            dst_at.row as isize,
            accumulate,
            lhs.as_ptr().wrapping_add(lhs_at.start),
            lhs_at.column as isize,
            lhs_at.row as isize,
            rhs.as_ptr().wrapping_add(rhs_at.start),
            rhs_at.column as isize,
            rhs_at.row as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        )
    };
    Ok(())
}

// SAFETY: the tasks holding it write disjoint matrices (see `multiply`).
#[allow(unsafe_code)]
unsafe impl Send for Dst {}
#[allow(unsafe_code)]
unsafe impl Sync for Dst {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fused::tests::random;
    use candle_core::{DType, Device, Var};

    /// Each product element summed in f64 from the two operands' values.
    fn reference(lhs: &Tensor, rhs: &Tensor) -> Vec<f32> {
        let (l, r) = (lhs.dims(), rhs.dims());
        let rank = l.len();
        let (m, k, n) = (l[rank - 2], l[rank - 1], r[rank - 1]);
        let a: Vec<f32> = lhs.flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f32> = rhs.flatten_all().unwrap().to_vec1().unwrap();
        let count = a.len() / (m * k).max(1);
        let mut out = Vec::new();
        for batch in 0..count {
            for i in 0..m {
                for j in 0..n {
                    let sum: f64 = (0..k)
                        .map(|p| {
                            a[batch * m * k + i * k + p] as f64
                                * b[batch * k * n + p * n + j] as f64
                        })
                        .sum();
                    out.push(sum as f32);
                }
            }
        }
        out
    }

    fn assert_close(got: &Tensor, want: &[f32]) {
        let got: Vec<f32> = got.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(got.len(), want.len());
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g - w).abs() <= 1e-5 * (1.0 + w.abs()),
                "element {i}: {g} vs {w}"
            );
        }
    }

    #[test]
    fn products_of_strided_batches_are_the_sums_they_stand_for() {
        // More matrices than threads (in parallel) and fewer (split each);
        // transposed operands; a batch dim of one; a head split of a
        // `[b, s, heads, d]` tensor, whose batch dims are not one stride apart.
        let q = random(&[2, 7, 3, 5], 1).transpose(1, 2).unwrap();
        let k = random(&[2, 9, 3, 5], 2).transpose(1, 2).unwrap();
        let cases = [
            (random(&[1, 1, 6, 4], 3), random(&[1, 1, 4, 3], 4)),
            (random(&[4, 6, 4], 5), random(&[4, 3, 4], 6).t().unwrap()),
            (random(&[11, 4], 7).t().unwrap(), random(&[11, 13], 8)),
            (q.clone(), k.t().unwrap()),
            (random(&[1, 16, 1, 32], 9), random(&[1, 16, 32, 5], 10)),
        ];
        for (lhs, rhs) in cases {
            let want = reference(&lhs.contiguous().unwrap(), &rhs.contiguous().unwrap());
            assert_close(&matmul(&lhs, &rhs).unwrap(), &want);
            let candles = lhs.contiguous().unwrap().matmul(&rhs.contiguous().unwrap());
            assert_close(&candles.unwrap(), &want);
        }
        // An inner dim of zero is a product of zeros, as candle's.
        let empty = Tensor::zeros((3, 2, 0), DType::F32, &Device::Cpu).unwrap();
        let zeros = matmul(&empty, &empty.t().unwrap()).unwrap();
        assert_eq!(zeros.dims(), [3, 2, 2]);
        assert_close(&zeros, &[0.0; 12]);
        // Shapes that do not fit are candle's error.
        assert!(matmul(&random(&[2, 3], 1), &random(&[4, 2], 2)).is_err());
    }

    #[test]
    fn gradients_are_candles_and_a_frozen_operand_gets_none() {
        let lhs = Var::from_tensor(&random(&[2, 3, 5, 4], 11)).unwrap();
        let rhs = Var::from_tensor(&random(&[2, 3, 6, 4], 12)).unwrap();
        let weights = random(&[2, 3, 5, 6], 13);
        let loss = |y: Tensor| (y * &weights).unwrap().sum_all().unwrap();
        let ours = loss(matmul(&lhs, &rhs.t().unwrap()).unwrap())
            .backward()
            .unwrap();
        let candles = loss(lhs.matmul(&rhs.t().unwrap()).unwrap())
            .backward()
            .unwrap();
        for var in [&lhs, &rhs] {
            let want: Vec<f32> = candles
                .get(var)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            assert_close(ours.get(var).unwrap(), &want);
        }
        let frozen = random(&[2, 3, 4, 6], 14);
        let grads = loss(matmul(&lhs, &frozen).unwrap()).backward().unwrap();
        assert!(grads.get(&frozen).is_none());
        assert!(grads.get(&lhs).is_some());
    }

    #[test]
    fn a_product_is_added_into_the_total_in_place_unless_a_graph_needs_it() {
        let lhs = random(&[3, 4, 6], 21);
        let rhs = random(&[3, 5, 6], 22).transpose(1, 2).unwrap();
        let start = random(&[3, 4, 5], 23);
        let product = reference(&lhs, &rhs.contiguous().unwrap());
        let start_values: Vec<f32> = start.flatten_all().unwrap().to_vec1().unwrap();
        let want: Vec<f32> = start_values
            .iter()
            .zip(&product)
            .map(|(s, p)| s + p)
            .collect();
        let total = start.copy().unwrap();
        let sum = add_product(total.clone(), &lhs, &rhs).unwrap();
        assert_close(&sum, &want);
        // The sum is in the total's own storage.
        assert_close(&total, &want);
        // An operand in a graph: a new tensor, and the gradient flows.
        let var = Var::from_tensor(&lhs).unwrap();
        let total = start.copy().unwrap();
        let sum = add_product(total.clone(), &var, &rhs).unwrap();
        assert_close(&sum, &want);
        assert_close(&total, &start_values);
        let grads = sum.sum_all().unwrap().backward().unwrap();
        assert!(grads.get(&var).is_some());
    }
}
