// placeholder, replaced below
export async function copyCommand(_argv: string[]): Promise<number> {
  return 1
}
