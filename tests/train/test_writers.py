from mrl_jax.train.writers import MetricWriter, expand_per_dim, format_scalars


def test_console_lines_show_every_nested_dim(tmp_path):
  scalars = expand_per_dim({"loss": 1.25, "top1_per_dim": [0.5, 0.75]}, (8, 16))
  assert scalars == {"loss": 1.25, "top1/dim_8": 0.5, "top1/dim_16": 0.75}
  assert format_scalars(10, scalars, "eval/") == "[eval/step 10] loss=1.25 top1[8: 0.5 16: 0.75]"
  lines = []
  writer = MetricWriter(str(tmp_path), echo=lines.append)
  writer.write_scalars(3, {"recall_at_10/dim_8": 0.25}, prefix="eval/")
  writer.close()
  assert lines == ["[eval/step 3] recall_at_10[8: 0.25]"]
